//! `sandtree serve --http ADDR` (off by default): a read-only web view of the episode trees.
//! `/` lists the episodes, `/episodes/{id}` is the page of `sandtree tree ID --html`, and
//! `/metrics` the engine's metrics in the Prometheus text format. It asks
//! the gRPC API in-process, so it shows exactly what Tree and ListEpisodes answer. A minimal
//! HTTP/1.1 server (GET and HEAD only, one request per connection, no authentication: bind it
//! to loopback).

use std::sync::Arc;

use sandtree_proto::v1 as pb;
use sandtree_proto::v1::sandtree_server::Sandtree;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::Api;

pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (api, metrics) = (api.clone(), metrics.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                handle(conn, api, metrics),
            )
            .await;
        });
    }
}

async fn handle(
    mut conn: tokio::net::TcpStream,
    api: Arc<Api>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 16 << 10 {
            return respond(
                &mut conn,
                431,
                "text/plain",
                "request header too large\n",
                false,
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body_too = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return respond(&mut conn, 405, "text/plain", "only GET\n", true).await;
    }
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" {
        api.engine.publish_gauges();
        let body = metrics.render();
        return respond(&mut conn, 200, "text/plain; version=0.0.4", &body, body_too).await;
    }
    let (code, kind, body) = page(path, &api).await;
    respond(&mut conn, code, kind, &body, body_too).await
}

async fn page(path: &str, api: &Api) -> (u16, &'static str, String) {
    if path == "/" {
        let r = api
            .list_episodes(tonic::Request::new(pb::ListEpisodesRequest::default()))
            .await;
        return match r {
            Ok(r) => (200, "text/html; charset=utf-8", index(&r.into_inner())),
            Err(s) => (500, "text/plain", format!("{}\n", s.message())),
        };
    }
    let Some(id) = path.strip_prefix("/episodes/") else {
        return (404, "text/plain", "not found\n".into());
    };
    let r = api
        .tree(tonic::Request::new(pb::TreeRequest {
            episode: id.to_string(),
            whole: true,
            outputs: true,
        }))
        .await;
    match r {
        Ok(r) => (
            200,
            "text/html; charset=utf-8",
            crate::client::tree_html(&r.into_inner()),
        ),
        Err(s) => {
            let code = match s.code() {
                tonic::Code::NotFound => 404,
                tonic::Code::InvalidArgument => 400,
                tonic::Code::FailedPrecondition => 410,
                _ => 500,
            };
            (code, "text/plain", format!("{}\n", s.message()))
        }
    }
}

fn index(r: &pb::ListEpisodesResponse) -> String {
    let esc = crate::client::escape_html;
    let mut rows = String::new();
    for e in &r.episodes {
        rows += &format!(
            "<tr><td><a class=\"episode\" href=\"/episodes/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&e.image),
            esc(&e.policy),
            esc(&e.status),
            e.turn,
            esc(&e.forked_from),
            id = esc(&e.id),
        );
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>sandtree episodes</title>\n\
         <style>body {{ font: 14px system-ui, sans-serif; margin: 1em; }} td, th {{ padding: 2px 10px; text-align: left; }}</style>\n\
         </head>\n<body>\n<h1>sandtree episodes</h1>\n<table>\n<tr><th>episode</th><th>image</th><th>policy</th><th>status</th><th>turn</th><th>forked from</th></tr>\n{rows}</table>\n</body>\n</html>\n"
    )
}

async fn respond(
    conn: &mut tokio::net::TcpStream,
    code: u16,
    kind: &str,
    body: &str,
    with_body: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; img-src data:\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    if with_body {
        conn.write_all(body.as_bytes()).await?;
    }
    conn.shutdown().await
}
