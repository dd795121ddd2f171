//! `serve --listen tcp://…`: every call over TCP needs the token of `--token-file`. The right
//! token works (create, step, delete through the CLI's `--addr`); a wrong or a missing one is
//! refused with UNAUTHENTICATED and changes nothing; the socket needs no token. A listener
//! without an acceptable token file is refused at start. TLS (`--tls-cert/--tls-key`) with a
//! self-signed certificate made by openssl(1), the CLI trusting it with `--tls-ca`. Prints the
//! median latency of one call over the socket, over TCP with the token, and over TLS.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sandtree_client::{connect, connect_tcp, Remote};
use sandtree_proto::v1 as pb;
use sandtree_tests::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_file(path: &Path, content: &str, mode: u32) -> PathBuf {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_path_buf()
}

/// A long random token, as the docs ask (hex of 32 bytes of /dev/urandom).
fn random_token() -> String {
    let mut b = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The CLI against the TCP listener only: its socket flag names a path where nothing listens.
fn cli_tcp(addr: &str, token_file: &Path, tls_ca: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(["--socket", "/nonexistent/sandtree.sock", "--addr", addr])
        .arg("--token-file")
        .arg(token_file);
    if let Some(ca) = tls_ca {
        c.arg("--tls-ca").arg(ca);
    }
    c.args(args)
        .env_remove("SANDTREE_ADDR")
        .env_remove("SANDTREE_TOKEN_FILE")
        .env_remove("SANDTREE_TLS_CA")
        .stdin(Stdio::null())
        .output()
        .expect("run sandtree")
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `serve` with `args` that must be refused at start: its exit status and stderr. It must fail
/// fast, before it sets anything up (no data dir is made).
fn refused_serve(dir: &Path, args: &[&str]) -> String {
    let data = dir.join(unique("data-"));
    let t = Instant::now();
    let o = Command::new(bin())
        .args(["serve", "--storage", "dir", "--data-dir"])
        .arg(&data)
        .arg("--socket")
        .arg(dir.join(unique("s-")).with_extension("sock"))
        .args(args)
        .env_remove("SANDTREE_TOKEN_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run sandtree serve");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "serve {args:?} started: {err}");
    assert!(t.elapsed() < Duration::from_secs(10), "slow refusal: {err}");
    assert!(
        !data.exists(),
        "serve {args:?} made its data dir before refusing"
    );
    err
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The medians of `n` ListEpisodes calls on each of two connections, taken in turn (so that
/// the load of the machine falls on both alike), after 20 calls of warm-up each.
async fn list_latency(
    a: &mut sandtree_client::Client,
    b: &mut sandtree_client::Client,
    n: usize,
) -> (Duration, Duration) {
    let (mut va, mut vb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + 20 {
        for (c, v) in [(&mut *a, &mut va), (&mut *b, &mut vb)] {
            let t = Instant::now();
            c.list_episodes(pb::ListEpisodesRequest::default())
                .await
                .unwrap();
            if i >= 20 {
                v.push(t.elapsed());
            }
        }
    }
    (median(va), median(vb))
}

fn assert_unauthenticated(r: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    let st = r.expect_err(what);
    assert_eq!(st.code(), tonic::Code::Unauthenticated, "{what}: {st:?}");
    assert_eq!(
        st.metadata()
            .get("sandtree-error")
            .and_then(|v| v.to_str().ok()),
        Some("unauthenticated"),
        "{what}: {st:?}"
    );
}

#[test]
fn a_listener_without_an_acceptable_token_file_is_refused_at_start() {
    let dir = TempDir::new("sandtree-tcp-refused-");
    let listen = format!("tcp://127.0.0.1:{}", free_port());
    let err = refused_serve(&dir.0, &["--listen", &listen]);
    assert!(err.contains("needs --token-file"), "{err}");

    for (name, content, mode, why) in [
        ("open", "s3cret", 0o644, "mode 0644"),
        ("group", "s3cret", 0o640, "mode 0640"),
        ("empty", " \n", 0o600, "is empty"),
    ] {
        let f = write_file(&dir.0.join(name), content, mode);
        let err = refused_serve(
            &dir.0,
            &["--listen", &listen, "--token-file", f.to_str().unwrap()],
        );
        assert!(
            err.contains(why) && err.contains("token file"),
            "{name}: {err}"
        );
    }
    let err = refused_serve(&dir.0, &["--listen", "127.0.0.1:7000"]);
    assert!(err.contains("tcp://HOST:PORT"), "{err}");
    let err = refused_serve(&dir.0, &["--tls-cert", "c.pem", "--tls-key", "k.pem"]);
    assert!(err.contains("--listen"), "{err}");
}

#[test]
fn tcp_calls_need_the_token_and_a_refused_call_changes_nothing() {
    if !require_sandbox_host() {
        return;
    }
    let keys = TempDir::new("sandtree-tcp-keys-");
    let token = write_file(
        &keys.0.join("token"),
        &format!("{}\n", random_token()),
        0o600,
    );
    let wrong = write_file(&keys.0.join("wrong"), &random_token(), 0o400);
    let port = free_port();
    let addr = format!("tcp://127.0.0.1:{port}");
    let svc = Service::start_with(
        Storage::Btrfs,
        &["--listen", &addr, "--token-file", token.to_str().unwrap()],
    );
    svc.image("busybox");

    // The right token: a whole episode over TCP.
    let ep = ok(
        cli_tcp(&addr, &token, None, &["create", "--image", "busybox"]),
        "create over tcp",
    )
    .trim()
    .to_string();
    let out = ok(
        cli_tcp(
            &addr,
            &token,
            None,
            &["step", &ep, "--json", "--", "echo hi > /f; cat /f"],
        ),
        "step over tcp",
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r["turn"].as_u64(), r["stdout"].as_str()),
        (Some(1), Some("hi\n"))
    );

    // A wrong token through the CLI: refused with the reason.
    let o = cli_tcp(&addr, &wrong, None, &["list"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("wrong token"),
        "{o:?}"
    );

    // Wrong and missing tokens on every kind of call: UNAUTHENTICATED, and no effect.
    let label = unique("tcp-refused-");
    rt().block_on(async {
        let mut bad = connect_tcp(&Remote {
            addr: format!("127.0.0.1:{port}"),
            token: "not-the-token".into(),
            tls_ca: None,
        })
        .await
        .unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut none = pb::sandtree_client::SandtreeClient::new(channel);
        let create = || pb::CreateEpisodeRequest {
            image: "busybox".into(),
            policy: "auto".into(),
            labels: [("t".to_string(), label.clone())].into(),
            ..Default::default()
        };
        let step = || pb::StepRequest {
            episode: ep.clone(),
            command: "echo changed > /f".into(),
            ..Default::default()
        };
        let del = || pb::DeleteEpisodeRequest {
            episode: ep.clone(),
        };
        assert_unauthenticated(bad.create_episode(create()).await, "create, wrong token");
        assert_unauthenticated(none.create_episode(create()).await, "create, no token");
        assert_unauthenticated(bad.step(step()).await, "step, wrong token");
        assert_unauthenticated(none.step(step()).await, "step, no token");
        assert_unauthenticated(bad.step_stream(step()).await, "stream, wrong token");
        assert_unauthenticated(none.delete_episode(del()).await, "delete, no token");
        assert_unauthenticated(bad.delete_episode(del()).await, "delete, wrong token");
        let fork = pb::ForkRequest {
            episode: ep.clone(),
            turn: 1,
            count: 1,
            keep_warm: 0,
        };
        assert_unauthenticated(bad.fork(fork).await, "fork, wrong token");
        assert_unauthenticated(none.health(pb::HealthRequest {}).await, "health, no token");
        // "Bearer" is the scheme: the bare token is not accepted either.
        let mut req = tonic::Request::new(pb::ListEpisodesRequest::default());
        let bare = std::fs::read_to_string(&token).unwrap();
        req.metadata_mut()
            .insert("authorization", bare.trim().parse().unwrap());
        assert_unauthenticated(none.list_episodes(req).await, "list, token without Bearer");
        // The same token with the scheme, on the plain tonic client: accepted.
        let mut req = tonic::Request::new(pb::ListEpisodesRequest::default());
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", bare.trim()).parse().unwrap(),
        );
        none.list_episodes(req).await.expect("list with the token");
    });

    // Nothing happened: over the socket (no token needed), no episode has the label, the
    // episode is alive at turn 1 with its file unchanged, and only one episode exists.
    let listed = svc.ok(&["list", "--json", "--label", &format!("t={label}")]);
    assert!(
        listed.trim().is_empty() || listed.trim() == "[]",
        "a refused create made {listed}"
    );
    let r = svc.step(&ep, "cat /f");
    assert_eq!(
        (r["turn"].as_u64(), r["stdout"].as_str()),
        (Some(2), Some("hi\n")),
        "{r}"
    );
    assert!(svc.ok(&["list"]).contains(&ep));

    // Latency of one call: the socket against TCP with the token (one connection each, same
    // service, same run).
    let n = 300;
    let (unix, tcp) = rt().block_on(async {
        let mut u = connect(&svc.socket).await.unwrap();
        let mut t = connect_tcp(&Remote {
            addr: format!("127.0.0.1:{port}"),
            token: std::fs::read_to_string(&token).unwrap().trim().to_string(),
            tls_ca: None,
        })
        .await
        .unwrap();
        let list = list_latency(&mut u, &mut t, n).await;
        // A no-effect step ("true"), 15 each way, taken in turn.
        let (mut su, mut st) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            for (c, v) in [(&mut u, &mut su), (&mut t, &mut st)] {
                let req = pb::StepRequest {
                    episode: ep.clone(),
                    command: "true".into(),
                    ..Default::default()
                };
                let t0 = Instant::now();
                c.step(req).await.unwrap();
                v.push(t0.elapsed());
            }
        }
        println!(
            "Step(\"true\") median of 15: unix socket {:?}, tcp with token {:?}",
            median(su),
            median(st)
        );
        list
    });
    println!(
        "ListEpisodes median of {n}: unix socket {:?}, tcp with token {:?}",
        unix, tcp
    );

    // Delete over TCP with the token.
    ok(
        cli_tcp(&addr, &token, None, &["delete", &ep]),
        "delete over tcp",
    );
    let listed = svc.ok(&["list", "--status", "deleted"]);
    assert!(listed.contains(&ep), "{listed}");
}

#[test]
fn tls_listener_with_a_self_signed_certificate() {
    if !require_sandbox_host() || !require(have("openssl"), "openssl(1) not found") {
        return;
    }
    let keys = TempDir::new("sandtree-tls-keys-");
    let (cert, key) = (keys.0.join("cert.pem"), keys.0.join("key.pem"));
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=sandtree-test",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        // An end-entity certificate: rustls refuses a CA certificate as the server's.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let token = write_file(&keys.0.join("token"), &random_token(), 0o600);
    let wrong = write_file(&keys.0.join("wrong"), &random_token(), 0o600);
    let port = free_port();
    let addr = format!("tcp://127.0.0.1:{port}");
    let svc = Service::start_with(
        Storage::Btrfs,
        &[
            "--listen",
            &addr,
            "--token-file",
            token.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );

    // Trusting the certificate, with the token: works (the socket still has no TLS).
    ok(
        cli_tcp(&addr, &token, Some(&cert), &["stats"]),
        "stats over tls",
    );
    svc.ok(&["list"]);
    let localhost = format!("tcp://localhost:{port}");
    ok(
        cli_tcp(&localhost, &token, Some(&cert), &["list"]),
        "list over tls by name",
    );
    // TLS does not replace the token.
    let o = cli_tcp(&addr, &wrong, Some(&cert), &["list"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("wrong token"),
        "{o:?}"
    );
    // Plaintext to the TLS listener fails.
    assert!(!cli_tcp(&addr, &token, None, &["list"]).status.success());
    // A certificate the client does not trust: refused by the client before any call.
    let other_key = keys.0.join("other-key.pem");
    let other = keys.0.join("other.pem");
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=other", "-keyout"])
        .arg(&other_key)
        .arg("-out")
        .arg(&other)
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = cli_tcp(&addr, &token, Some(&other), &["list"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("certificate"),
        "{o:?}"
    );

    let n = 300;
    let (unix, tls) = rt().block_on(async {
        let mut u = connect(&svc.socket).await.unwrap();
        let mut t = connect_tcp(&Remote {
            addr: format!("127.0.0.1:{port}"),
            token: std::fs::read_to_string(&token).unwrap().trim().to_string(),
            tls_ca: Some(cert.clone()),
        })
        .await
        .unwrap();
        list_latency(&mut u, &mut t, n).await
    });
    println!("ListEpisodes median of {n}: unix socket {unix:?}, tls with token {tls:?}");
}
