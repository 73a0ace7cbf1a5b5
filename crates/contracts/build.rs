//! Generates the event types from `proto/` with protox (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("shop/events/v1/order.proto"),
        root.join("shop/events/v1/inventory.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    prost_build::Config::new()
        .enable_type_names()
        .compile_fds(descriptors)?;
    Ok(())
}
