//! Generates the gRPC code from proto/. protoc comes vendored (protoc-bin-vendored), so a
//! fresh machine needs nothing beyond cargo.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The code generator runs the protoc named by PROTOC.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/weft/v1/weft.proto"], &["proto"])?;
    Ok(())
}
