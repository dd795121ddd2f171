fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::process::Command::new(std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into()))
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("protoc not found: install the Debian package protobuf-compiler (scripts/setup.sh does)".into());
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["sandtree/v1/sandtree.proto"], &["."])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["criu/rpc.proto", "criu/pagemap.proto"], &["."])?;
    println!("cargo:rerun-if-changed=sandtree/v1/sandtree.proto");
    println!("cargo:rerun-if-changed=criu/rpc.proto");
    println!("cargo:rerun-if-changed=criu/pagemap.proto");
    Ok(())
}
