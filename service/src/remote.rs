//! `serve --listen`: the TCP listener beside the unix socket — its address, its token (read and
//! checked at start, before anything else is set up) and its optional TLS. The check of every
//! call is `server::TokenCheck`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use anyhow::{Context, Result};

/// A configured TCP listener, not yet bound.
pub struct Listener {
    pub addr: SocketAddr,
    pub token: String,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Listener {
    /// The listener `serve` was asked for, if any. Refused, with the reason, when `--listen`
    /// comes without a token file, the token file is not acceptable
    /// (`sandtree_client::read_token_file`: empty, or group or others may access it), or TLS
    /// files are given without `--listen` or cannot be read.
    pub fn configure(
        listen: Option<&str>,
        token_file: Option<&Path>,
        tls: Option<(&Path, &Path)>,
    ) -> Result<Option<Listener>> {
        let Some(listen) = listen else {
            if tls.is_some() {
                anyhow::bail!(
                    "--tls-cert and --tls-key are for the TCP listener: add --listen tcp://HOST:PORT"
                );
            }
            return Ok(None);
        };
        let hostport = sandtree_client::parse_tcp_addr(listen).context("--listen")?;
        let token_file = token_file.with_context(|| {
            format!(
                "--listen {listen} needs --token-file FILE (or SANDTREE_TOKEN_FILE): sandtree serves \
                 TCP only to calls that carry a token; put a long random one (e.g. `openssl rand \
                 -hex 32`) in a file of mode 0600"
            )
        })?;
        let token = sandtree_client::read_token_file(token_file).context("--token-file")?;
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("--listen {listen}"))?
            .next()
            .with_context(|| format!("--listen {listen}: no address"))?;
        let tls = match tls {
            None => None,
            Some((cert, key)) => {
                let cert_pem = std::fs::read(cert)
                    .with_context(|| format!("read --tls-cert {}", cert.display()))?;
                let key_pem = std::fs::read(key)
                    .with_context(|| format!("read --tls-key {}", key.display()))?;
                Some(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem)),
                )
            }
        };
        Ok(Some(Listener { addr, token, tls }))
    }
}
