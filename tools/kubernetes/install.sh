#!/usr/bin/env bash
# A Kubernetes control plane and the pulumi-kubernetes resource plugin for machines without them (CI here):
# builds, once per version, from the Go module proxy at the versions the two go.mod files pin
#   - ember-kube (cluster/): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok in one binary,
#   - pulumi-resource-kubernetes (plugin/): the provider plugin at the commit of the release the Python SDK pins,
# copies kwok's stages (node and pod lifecycles) beside them, and prints the folder. cluster.py starts a cluster
# from it. Cached outside the clone (EMBER_TOOLS_CACHE, default ~/.cache/ember), keyed by the sources here, so a
# second run costs a second.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command -v go >/dev/null || { echo "install.sh: no Go toolchain on PATH" >&2; exit 3; }
# The pulumi-kubernetes release whose commit plugin/go.mod pins (v4.25.0 is f47bc2d6f199); pyproject.toml pins
# the Python SDK of the same release, which asks the engine for this plugin version.
plugin_version=4.25.0
kubernetes=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$here/cluster/go.mod")
sources=$(cat "$0" "$here"/cluster/go.* "$here"/cluster/*.go "$here"/plugin/go.* "$here"/plugin/*.go | sha256sum | cut -c1-12)
cache=${EMBER_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/kubernetes-$kubernetes-$sources
if [ -f "$cache/.complete" ]; then
    echo "$cache/bin"
    exit 0
fi
mkdir -p "$(dirname "$cache")"
staging=$(mktemp -d "${cache}.XXXXXX")
trap 'rm -rf "$staging" "$here/plugin/schema-embed.json" "$here/plugin/terraform-mapping-embed.json"' EXIT
export GOFLAGS=-mod=readonly
# A module's folder in the module cache, downloaded first: `go list -m` alone names no folder for a module
# not downloaded yet (a fresh machine).
module_dir() { (cd "$here/$1" && go mod download "$2" && go list -m -f '{{.Dir}}' "$2"); }
echo "building Kubernetes $kubernetes (etcd, apiserver, controller manager, scheduler, kwok): first time only, many minutes" >&2
go build -C "$here/cluster" -trimpath -o "$staging/bin/ember-kube" .

echo "building the pulumi-kubernetes plugin $plugin_version: first time only, many minutes" >&2
upstream=$(module_dir plugin github.com/pulumi/pulumi-kubernetes/provider/v4)/cmd/pulumi-resource-kubernetes
# What upstream's Makefile generates before building (its generate.go): the schema with the version set.
python3 - "$upstream" "$plugin_version" "$here/plugin" <<'PY'
import json, shutil, sys
upstream, version, out = sys.argv[1:]
schema = json.load(open(f"{upstream}/schema.json"))
schema["version"] = version
json.dump(schema, open(f"{out}/schema-embed.json", "w"), separators=(",", ":"))
shutil.copyfile(f"{upstream}/terraform-mapping.json", f"{out}/terraform-mapping-embed.json")
PY
go build -C "$here/plugin" -trimpath \
    -ldflags "-X github.com/pulumi/pulumi-kubernetes/provider/v4/pkg/version.Version=$plugin_version" \
    -o "$staging/bin/pulumi-resource-kubernetes" .

# kwok's stages, as kwokctl configures them, less "a Job's pods complete": nodes become Ready and keep a lease,
# pods become Ready, deleted pods go away. A Job's pod finishes when whoever plays its kubelet says so (the
# tests run its command on the host).
stages=$(module_dir cluster sigs.k8s.io/kwok)/kustomize/stage
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
             pod/fast/pod-ready pod/fast/pod-delete; do
    cat "$stages/$stage.yaml"; echo "---"
done > "$staging/bin/kwok-stages.yaml"
echo "$plugin_version" > "$staging/bin/pulumi-resource-kubernetes.version"
"$staging/bin/ember-kube" kube-apiserver --version >/dev/null
touch "$staging/.complete"
rm -rf "$cache"
mv "$staging" "$cache"
echo "$cache/bin"
