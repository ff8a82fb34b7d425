//! Generates the gRPC client and server of Istio's certificate API from our own
//! `proto/istio/v1/auth/ca.proto`, with the protoc that `protoc-bin-vendored` ships (no system
//! protoc needed). `google.protobuf.Struct` maps to `prost-types`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build runs the protoc that PROTOC names (the build script is single-threaded).
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=proto/istio/v1/auth/ca.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[std::path::PathBuf::from("proto/istio/v1/auth/ca.proto")],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    Ok(())
}
