//go:build tools

// The CRD modules: required (so go.mod and go.sum pin them) but never linked. The tests read
// their manifests from the module cache, located with `go list -m -json <module>`:
// istio.io/api's kubernetes/customresourcedefinitions.gen.yaml and sigs.k8s.io/gateway-api's
// config/crd/standard/*.yaml.
package main

import (
	_ "istio.io/api/security/v1"
	_ "sigs.k8s.io/gateway-api/apis/v1"
)
