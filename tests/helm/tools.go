//go:build tools

// Helm, for the chart's tests (`helm lint --strict`, `helm template`) and the install, upgrade
// and uninstall tests: built from its module at the pinned release by `cargo xtask setup` into
// target/kube/bin/helm. Nothing here is linked into the product.
package main

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
