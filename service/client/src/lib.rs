//! sandtree's Rust client library: a connection to the service's unix socket over which the
//! public gRPC API (`sandtree_proto::v1`) is called. The CLI's client subcommands, the bench and
//! the demo use it; it knows nothing of the service beyond the API.

use std::path::Path;

use anyhow::Result;
use sandtree_proto::v1::sandtree_client::SandtreeClient;
use tonic::transport::Channel;

/// A client of the service's API on one connection.
pub type Client = SandtreeClient<Channel>;

/// Connects to the service listening on `socket`; messages may be as large as the service's
/// (80 MiB: the largest file write or read, and a step's stdin).
pub async fn connect(socket: &Path) -> Result<Client> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
            anyhow::anyhow!("the sandtree service is not running at {} ({cause}); start it with `sandtree serve`", socket.display())
        })?;
    Ok(SandtreeClient::new(channel)
        .max_decoding_message_size(80 << 20)
        .max_encoding_message_size(80 << 20))
}

/// A gRPC status as a one-line error.
pub fn rpc_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
