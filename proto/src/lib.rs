//! Generated protocol code: sandtree's gRPC API (`v1`) and CRIU's swrk RPC and page map image messages (`criu`).
//! Only the service crate uses this; domain types live in `branching` and `storage`.

/// How the API's types print as JSON (the CLI's `--json`).
pub mod json {
    /// Bytes as text: UTF-8, with invalid sequences replaced.
    pub fn lossy<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(v))
    }
}

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sandtree.v1");
}

#[allow(clippy::all, missing_docs)]
pub mod criu {
    tonic::include_proto!("criu");
}
