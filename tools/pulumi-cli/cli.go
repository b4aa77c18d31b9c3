//go:build tools

// The Pulumi CLI is built from its module at the version go.mod pins; this import keeps the requirement.
package tools

import _ "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"
