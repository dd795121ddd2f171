fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::process::Command::new(std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into()))
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("protoc not found: install the Debian package protobuf-compiler (scripts/setup.sh does)".into());
    }
    // The CLI's --json output is these types, serialized: it cannot drift from the API. Bytes
    // (a step's output, file data) print as text, lossy UTF-8 (`--json` is for reading; the
    // raw bytes are on the wire and in `sandtree step`/`read` without --json).
    let lossy = "#[serde(serialize_with = \"crate::json::lossy\")]";
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .type_attribute(".sandtree.v1", "#[derive(serde::Serialize)]")
        .field_attribute(".sandtree.v1.StepResponse.stdout", lossy)
        .field_attribute(".sandtree.v1.StepResponse.stderr", lossy)
        .field_attribute(".sandtree.v1.StepRequest.stdin", lossy)
        .field_attribute(".sandtree.v1.WriteFileRequest.data", lossy)
        .field_attribute(".sandtree.v1.ReadFileResponse.data", lossy)
        .field_attribute(".sandtree.v1.StepEvent.event.stdout", lossy)
        .field_attribute(".sandtree.v1.StepEvent.event.stderr", lossy)
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
