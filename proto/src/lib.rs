//! Generated protocol code: sandtree's gRPC API (`v1`) and CRIU's swrk RPC and page map image messages (`criu`).
//! Only the service crate uses this; domain types live in `branching` and `storage`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sandtree.v1");
}

#[allow(clippy::all, missing_docs)]
pub mod criu {
    tonic::include_proto!("criu");
}
