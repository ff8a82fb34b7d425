//go:build tools

// Jaeger, the tracing backend of the waypoint's tracing test: built from its module at the
// pinned release by `cargo xtask setup` into target/kube/bin/jaeger (one binary: OTLP receiver,
// in-memory store, query API). Nothing here is linked into the product.
package main

import (
	_ "github.com/jaegertracing/jaeger/cmd/jaeger"
)
