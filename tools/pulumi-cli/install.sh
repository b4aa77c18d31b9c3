#!/usr/bin/env bash
# The Pulumi CLI for machines without one (CI here): builds, once per version, the CLI and Ember's Python
# language host from the Go module proxy at the versions go.mod pins, installs them with the executor that
# ships in sdk/v3 and Ember's two plugin scripts, and prints the folder to put first on PATH.
#
#   export PATH="$(tools/pulumi-cli/install.sh):$PATH"
#
# The binaries are cached outside the clone (EMBER_TOOLS_CACHE, default ~/.cache/ember), keyed by the
# Pulumi version and by the sources here, so a second run costs a second. Users with an installed Pulumi
# CLI do not need this.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command -v go >/dev/null || { echo "install.sh: no Go toolchain on PATH; install the Pulumi CLI instead" >&2; exit 3; }
version=$(awk '$1 == "github.com/pulumi/pulumi/pkg/v3" {print $2}' "$here/go.mod")
sources=$(cat "$here/go.mod" "$here/go.sum" "$here"/language-host/*.go "$here"/plugins/* | sha256sum | cut -c1-12)
cache=${EMBER_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/pulumi-$version-$sources
if [ -f "$cache/.complete" ]; then
    echo "$cache/bin"
    exit 0
fi
echo "building the Pulumi CLI $version and Ember's Python language host (first time only: several minutes)" >&2
mkdir -p "$(dirname "$cache")"
staging=$(mktemp -d "${cache}.XXXXXX")
trap 'rm -rf "$staging"' EXIT
export GOFLAGS=-mod=readonly
stamp="-X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=$version"
go build -C "$here" -trimpath -ldflags "$stamp" -o "$staging/bin/pulumi" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi
go build -C "$here" -trimpath -ldflags "-X main.version=${version#v}" -o "$staging/bin/pulumi-language-python" ./language-host
sdk=$(go list -C "$here" -m -f '{{.Dir}}' github.com/pulumi/pulumi/sdk/v3)
install -m 755 "$sdk/python/cmd/pulumi-language-python-exec" "$staging/bin/"
install -m 755 "$here"/plugins/pulumi-* "$staging/bin/"
install -m 644 "$here/plugins/python-of-program.sh" "$staging/bin/"
"$staging/bin/pulumi" version >/dev/null
touch "$staging/.complete"
rm -rf "$cache"
mv "$staging" "$cache"
trap - EXIT
echo "$cache/bin"
