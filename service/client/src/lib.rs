//! sandtree's Rust client library: a connection to the service over which the public gRPC API
//! (`sandtree_proto::v1`) is called — its unix socket, or its TCP listener (`serve --listen`)
//! with the token every TCP call carries, optionally over TLS. The CLI's client subcommands, the
//! bench and the demo use it; it knows nothing of the service beyond the API.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sandtree_proto::v1::sandtree_client::SandtreeClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of the service's API on one connection.
pub type Client = SandtreeClient<InterceptedService<Channel, Auth>>;

/// The metadata key that carries the token on TCP calls, as `Bearer <token>`.
pub const TOKEN_KEY: &str = "authorization";

/// Longest token a token file may hold, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Where the service is.
#[derive(Clone)]
pub enum Target {
    /// Its unix socket: no token (the socket's mode 0600 is the access control).
    Unix(PathBuf),
    /// Its TCP listener.
    Tcp(Remote),
}

/// A service's TCP listener and what a call to it needs.
#[derive(Clone)]
pub struct Remote {
    /// `HOST:PORT`.
    pub addr: String,
    /// The token (a token file's content, trimmed).
    pub token: String,
    /// A CA certificate (PEM) to verify the service's TLS certificate with; None: plaintext.
    pub tls_ca: Option<PathBuf>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp(r) if r.tls_ca.is_some() => write!(f, "tcp://{} (TLS)", r.addr),
            Target::Tcp(r) => write!(f, "tcp://{}", r.addr),
        }
    }
}

// The token never appears in a debug print.
impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("addr", &self.addr)
            .field("tls_ca", &self.tls_ca)
            .finish_non_exhaustive()
    }
}

/// `tcp://HOST:PORT` → `HOST:PORT` (the one address form `--addr` and `serve --listen` take).
pub fn parse_tcp_addr(s: &str) -> Result<String> {
    let rest = s
        .strip_prefix("tcp://")
        .with_context(|| format!("address {s:?} must be tcp://HOST:PORT"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("address {s:?} has no port (tcp://HOST:PORT)"))?;
    if host.is_empty() || host.contains('/') || port.parse::<u16>().is_err() {
        anyhow::bail!("address {s:?} must be tcp://HOST:PORT");
    }
    Ok(rest.to_string())
}

/// Reads a token file: its content, trimmed. Refused, with the reason, when the file is not a
/// regular file, group or others have any permission on it (it must be 0600 or 0400), or the
/// token is empty, longer than [`MAX_TOKEN_BYTES`], or not printable ASCII (it travels in
/// gRPC metadata). The service and the clients read it the same way.
pub fn read_token_file(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("token file {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("token file {} is not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "token file {} has mode {mode:04o}: group and others must have no access (chmod 600 {})",
            path.display(),
            path.display()
        );
    }
    let raw = std::fs::read(path).with_context(|| format!("read token file {}", path.display()))?;
    let token = std::str::from_utf8(&raw)
        .ok()
        .map(str::trim)
        .with_context(|| format!("token file {} is not text", path.display()))?;
    if token.is_empty() {
        anyhow::bail!("token file {} is empty", path.display());
    }
    if token.len() > MAX_TOKEN_BYTES {
        anyhow::bail!(
            "token file {} holds more than {MAX_TOKEN_BYTES} bytes",
            path.display()
        );
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "token file {}: the token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Adds the token to every call of a TCP client; nothing on the unix socket.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(TOKEN_KEY, v.clone());
        }
        Ok(req)
    }
}

fn client(channel: Channel, auth: Auth) -> Client {
    // Messages may be as large as the service's (80 MiB: the largest file write or read, and a
    // step's stdin).
    SandtreeClient::with_interceptor(channel, auth)
        .max_decoding_message_size(80 << 20)
        .max_encoding_message_size(80 << 20)
}

fn cause(e: &tonic::transport::Error) -> String {
    std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Connects to the service listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Client> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the sandtree service is not running at {} ({}); start it with `sandtree serve`",
                socket.display(),
                cause(&e)
            )
        })?;
    Ok(client(channel, Auth(None)))
}

/// Connects to a service's TCP listener; every call carries `authorization: Bearer <token>`.
/// With `tls_ca`, over TLS, the service's certificate verified against that CA for the host
/// of `addr`.
pub async fn connect_tcp(remote: &Remote) -> Result<Client> {
    let bearer: MetadataValue<Ascii> = format!("Bearer {}", remote.token)
        .parse()
        .context("the token cannot be sent as gRPC metadata")?;
    let scheme = if remote.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", remote.addr))
            .with_context(|| format!("address tcp://{}", remote.addr))?
            .tcp_nodelay(true);
    if let Some(ca) = &remote.tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("read --tls-ca {}", ca.display()))?;
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .with_context(|| format!("TLS with CA {}", ca.display()))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "the sandtree service is not reachable at {} ({})",
            Target::Tcp(remote.clone()),
            cause(&e)
        )
    })?;
    Ok(client(channel, Auth(Some(bearer))))
}

/// Connects to `target`.
pub async fn connect_to(target: &Target) -> Result<Client> {
    match target {
        Target::Unix(socket) => connect(socket).await,
        Target::Tcp(remote) => connect_tcp(remote).await,
    }
}

/// A gRPC status as a one-line error.
pub fn rpc_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tcp_addresses() {
        assert_eq!(
            parse_tcp_addr("tcp://127.0.0.1:7000").unwrap(),
            "127.0.0.1:7000"
        );
        assert_eq!(parse_tcp_addr("tcp://[::1]:7000").unwrap(), "[::1]:7000");
        assert_eq!(
            parse_tcp_addr("tcp://host.example:1").unwrap(),
            "host.example:1"
        );
        for bad in [
            "127.0.0.1:7000",
            "http://h:1",
            "tcp://h",
            "tcp://:1",
            "tcp://h:x",
            "tcp://h:70000",
            "tcp://h/p:1",
        ] {
            assert!(parse_tcp_addr(bad).is_err(), "{bad} accepted");
        }
    }

    fn token_file(content: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    #[test]
    fn token_files() {
        let (_d, p) = token_file("  s3cret-token\n", 0o600);
        assert_eq!(read_token_file(&p).unwrap(), "s3cret-token");
        let (_d, p) = token_file("s3cret", 0o400);
        assert_eq!(read_token_file(&p).unwrap(), "s3cret");
        for (content, mode, why) in [
            ("s3cret", 0o644, "mode 0644"),
            ("s3cret", 0o640, "mode 0640"),
            ("s3cret", 0o604, "mode 0604"),
            (" \n", 0o600, "is empty"),
            ("two words", 0o600, "printable ASCII"),
        ] {
            let (_d, p) = token_file(content, mode);
            let e = format!("{:#}", read_token_file(&p).unwrap_err());
            assert!(e.contains(why), "{content:?} {mode:o}: {e}");
        }
        let e = format!(
            "{:#}",
            read_token_file(Path::new("/nonexistent/token")).unwrap_err()
        );
        assert!(e.contains("/nonexistent/token"), "{e}");
    }

    /// A Kubernetes Secret volume (deploy/k8s): `token` is a symlink to `..data/token`, `..data`
    /// a symlink to a timestamped dir holding the file with the volume's `defaultMode`. The
    /// checks follow the links and judge the file: 0400 is accepted, 0440 (what a pod's
    /// `fsGroup` makes of it) is refused.
    #[test]
    fn secret_volume_token_files() {
        let dir = tempfile::tempdir().unwrap();
        let ts = dir.path().join("..2026_01_01_00_00_00.000000000");
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("token"), "s3cret-from-a-secret\n").unwrap();
        std::os::unix::fs::symlink(ts.file_name().unwrap(), dir.path().join("..data")).unwrap();
        let p = dir.path().join("token");
        std::os::unix::fs::symlink("..data/token", &p).unwrap();
        let set = |mode| {
            std::fs::set_permissions(ts.join("token"), std::fs::Permissions::from_mode(mode))
                .unwrap()
        };
        set(0o400);
        assert_eq!(read_token_file(&p).unwrap(), "s3cret-from-a-secret");
        set(0o440);
        let e = format!("{:#}", read_token_file(&p).unwrap_err());
        assert!(e.contains("mode 0440"), "{e}");
    }
}
