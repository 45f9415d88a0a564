//! Transport security and provider credentials: TLS and mTLS handshakes, certificate reload,
//! provider key rotation under load, refused keys, and no key in any log line.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use llm_gateway::{
    config::{Config, Overrides},
    mock_upstream::{MockSettings, MockUpstream},
    pb::{
        self, llm_gateway_admin_client::LlmGatewayAdminClient, llm_gateway_client::LlmGatewayClient,
    },
    reload::ConfigSource,
    server::{self, ServeError, ServeOptions},
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::{ADMIN_TOKEN, reason, reply_text, request};

// -------------------------------------------------------------------------------------------
// Certificates
// -------------------------------------------------------------------------------------------

/// A test CA that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and key (PEM) for `name`.
    fn leaf(&self, name: &str, client: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a server certificate for `localhost` to `dir/server.{crt,key}`.
    fn write_server_cert(&self, dir: &Path) {
        let (cert, key) = self.leaf("localhost", false);
        // Write beside and rename, as secret mounts and cert managers do.
        for (name, content) in [("server.crt", cert), ("server.key", key)] {
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
        }
    }
}

// -------------------------------------------------------------------------------------------
// A gateway started from a config file, with reload
// -------------------------------------------------------------------------------------------

struct Running {
    addr: SocketAddr,
    reload: Arc<tokio::sync::Notify>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Running {
    /// Starts a gateway from the config file at `path`; reloads read it again.
    async fn start(path: &Path) -> Running {
        let path: PathBuf = path.to_owned();
        let source: ConfigSource = Arc::new(move || {
            // No HTTP front: tests must not bind its fixed default port.
            Config::load(Some(&path), &Overrides::default(), &|_| None).map(|mut c| {
                c.http.listen = None;
                c
            })
        });
        let config = source().expect("valid test config");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reload = Arc::new(tokio::sync::Notify::new());
        let (tx, rx) = oneshot::channel::<()>();
        let options = ServeOptions {
            config_source: Some(source),
            reload_signal: Some(reload.clone()),
            ..Default::default()
        };
        let handle = tokio::spawn(server::run_with(
            config,
            listener,
            async {
                let _ = rx.await;
            },
            options,
        ));
        Running {
            addr,
            reload,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// A plaintext channel.
    async fn plain(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A TLS channel trusting `ca`, with an optional client identity (cert, key).
    async fn tls(&self, ca: &str, identity: Option<(&str, &str)>) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        // Connect to the bound address; the certificate is checked against `localhost`.
        Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

type WithToken = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

fn admin(
    channel: Channel,
) -> LlmGatewayAdminClient<tonic::service::interceptor::InterceptedService<Channel, WithToken>> {
    fn with_token(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
        );
        Ok(r)
    }
    LlmGatewayAdminClient::with_interceptor(channel, with_token as fn(_) -> _)
}

/// The parts every test config shares, so that a reload compares equal outside what a test
/// changes.
fn base_toml() -> String {
    format!(
        r#"
[server]
shutdown_grace = "5s"
deadline_margin = "100ms"
[store]
path = ":memory:"
[admin]
token = "{ADMIN_TOKEN}"
[metrics]
listen = "off"
"#
    )
}

fn tls_toml(dir: &Path, client_ca: bool) -> String {
    let mut s = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display()
    );
    if client_ca {
        s.push_str(&format!(
            "client_ca = \"{}\"\n",
            dir.join("client-ca.crt").display()
        ));
    }
    s
}

async fn chat_ok(channel: Channel) -> Result<String, tonic::Status> {
    let response = LlmGatewayClient::new(channel)
        .chat(request("mock/echo", "hello over tls"))
        .await?;
    Ok(reply_text(&response.into_inner()))
}

// -------------------------------------------------------------------------------------------
// TLS and mTLS
// -------------------------------------------------------------------------------------------

#[tokio::test]
async fn tls_handshake_and_a_chat_call() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    ca.write_server_cert(dir.path());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("{}{}", base_toml(), tls_toml(dir.path(), false)),
    )
    .unwrap();
    let gateway = Running::start(&config).await;

    let channel = gateway.tls(&ca.pem(), None).await.unwrap();
    let reply = chat_ok(channel).await.unwrap();
    assert!(reply.contains("hello over tls"), "{reply}");

    // Plaintext to a TLS listener fails.
    let plain = Channel::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(chat_ok(channel).await.is_err());
    }
    // A client that does not trust the issuer refuses the server.
    let other = Ca::new("other ca");
    assert!(gateway.tls(&other.pem(), None).await.is_err());
    gateway.stop().await;
}

#[tokio::test]
async fn mtls_accepts_a_valid_client_cert_and_rejects_a_missing_or_foreign_one() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    server_ca.write_server_cert(dir.path());
    let client_ca = Ca::new("client ca");
    std::fs::write(dir.path().join("client-ca.crt"), client_ca.pem()).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("{}{}", base_toml(), tls_toml(dir.path(), true)),
    )
    .unwrap();
    let gateway = Running::start(&config).await;

    let (cert, key) = client_ca.leaf("billing-service", true);
    let channel = gateway
        .tls(&server_ca.pem(), Some((&cert, &key)))
        .await
        .unwrap();
    chat_ok(channel).await.unwrap();

    // No client certificate: the handshake (or the first call, with TLS 1.3) fails.
    match gateway.tls(&server_ca.pem(), None).await {
        Err(_) => {}
        Ok(channel) => assert!(
            chat_ok(channel).await.is_err(),
            "served without a client cert"
        ),
    }
    // A client certificate from another CA is refused too.
    let rogue = Ca::new("rogue ca");
    let (cert, key) = rogue.leaf("billing-service", true);
    match gateway.tls(&server_ca.pem(), Some((&cert, &key))).await {
        Err(_) => {}
        Ok(channel) => assert!(
            chat_ok(channel).await.is_err(),
            "served a foreign client cert"
        ),
    }
    gateway.stop().await;
}

#[tokio::test]
async fn certificates_reload_on_request_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new("first ca");
    first.write_server_cert(dir.path());
    let config = dir.path().join("gateway.toml");
    // A long poll interval: this test reloads explicitly.
    std::fs::write(
        &config,
        format!(
            "{}{}reload_interval = \"1h\"\n",
            base_toml(),
            tls_toml(dir.path(), false)
        ),
    )
    .unwrap();
    let gateway = Running::start(&config).await;
    let channel = gateway.tls(&first.pem(), None).await.unwrap();
    chat_ok(channel.clone()).await.unwrap();

    // Replace the files and reload through the admin api.
    let second = Ca::new("second ca");
    second.write_server_cert(dir.path());
    let report = admin(channel.clone())
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.reloaded, ["tls"]);
    assert!(report.restart_needed.is_empty(), "{report:?}");
    // New connections see the new certificate; the established one keeps working.
    chat_ok(gateway.tls(&second.pem(), None).await.unwrap())
        .await
        .unwrap();
    assert!(gateway.tls(&first.pem(), None).await.is_err());
    chat_ok(channel.clone()).await.unwrap();

    // A broken certificate is refused and the current one stays.
    std::fs::write(dir.path().join("server.crt"), "not a certificate").unwrap();
    let status = admin(channel.clone())
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&status), "TLS_INVALID");
    assert!(status.message().contains("tls.cert"), "{status:?}");
    chat_ok(gateway.tls(&second.pem(), None).await.unwrap())
        .await
        .unwrap();
    gateway.stop().await;
}

#[tokio::test]
async fn certificates_reload_when_the_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new("first ca");
    first.write_server_cert(dir.path());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "{}{}reload_interval = \"50ms\"\n",
            base_toml(),
            tls_toml(dir.path(), false)
        ),
    )
    .unwrap();
    let gateway = Running::start(&config).await;
    chat_ok(gateway.tls(&first.pem(), None).await.unwrap())
        .await
        .unwrap();
    let second = Ca::new("second ca");
    second.write_server_cert(dir.path());
    // The watcher polls the files' modification times; wait for it (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) = gateway.tls(&second.pem(), None).await
            && chat_ok(channel).await.is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.stop().await;
}

// -------------------------------------------------------------------------------------------
// Provider keys
// -------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures this (current-thread) runtime's logs, the server's included.
    fn install() -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || sink.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

fn provider_toml(mock: &MockUpstream, keys: &str) -> String {
    format!(
        "{}[providers.openai]\nkind = \"openai\"\nbase_url = \"{}\"\n{keys}\n",
        base_toml(),
        mock.openai_base_url()
    )
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_provider_key_moves_traffic_to_the_next() {
    let (logs, _guard) = Captured::install();
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    mock.accept_keys(Some(&["sk-good-KEYVALUE-2"]));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        provider_toml(
            &mock,
            r#"api_keys = ["sk-revoked-KEYVALUE-1", "sk-good-KEYVALUE-2"]"#,
        ),
    )
    .unwrap();
    let gateway = Running::start(&config).await;
    let mut client = LlmGatewayClient::new(gateway.plain().await);
    for _ in 0..6 {
        client
            .chat(request("openai/gpt-4o-mini", "hi"))
            .await
            .unwrap();
    }
    let stats = mock.stats();
    // The refused key was tried once, then rested; every call succeeded on the next key.
    assert_eq!(stats.requests_with_key("sk-revoked-KEYVALUE-1"), 1);
    assert_eq!(stats.requests_with_key("sk-good-KEYVALUE-2"), 6);

    // When every key is refused, calls fail with the authentication class, as before.
    mock.accept_keys(Some(&["sk-nobody"]));
    let status = client
        .chat(request("openai/gpt-4o-mini", "hi"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "AUTHENTICATION");
    assert!(!status.message().contains("KEYVALUE"), "{status:?}");
    gateway.stop().await;

    let logs = logs.text();
    assert!(
        logs.contains("provider api key rests"),
        "the test captured the gateway's logs:\n{logs}"
    );
    assert!(
        !logs.contains("KEYVALUE"),
        "a key leaked into the logs:\n{logs}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn provider_key_rotation_under_concurrent_calls_fails_no_call() {
    let (logs, _guard) = Captured::install();
    let mock = MockUpstream::start(MockSettings {
        latency: Duration::from_millis(2),
        ..MockSettings::default()
    })
    .await
    .unwrap();
    let old = "sk-old-ROTATED-0001";
    let new = "sk-new-ROTATED-0002";
    mock.accept_keys(Some(&[old]));
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("openai.key");
    std::fs::write(&key_file, format!("{old}\n")).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        provider_toml(&mock, &format!("api_key_file = \"{}\"", key_file.display())),
    )
    .unwrap();
    let gateway = Running::start(&config).await;
    let channel = gateway.plain().await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let mut client = LlmGatewayClient::new(channel.clone());
        workers.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match client.chat(request("openai/gpt-4o-mini", "hi")).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(status) => {
                        failures.lock().unwrap().push(status);
                        0
                    }
                };
            }
        });
    }
    let stats = mock.stats().clone();
    let wait_for = |key: &'static str, n: u64| {
        let stats = stats.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                while stats.requests_with_key(key) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} calls with {key}"));
        }
    };
    wait_for(old, 30).await;

    // Rotate: the provider accepts both, the secret file changes, SIGHUP reloads, and the
    // old key is revoked at once (calls still holding it retry on the new one).
    mock.accept_keys(Some(&[old, new]));
    std::fs::write(&key_file, format!("{new}\n")).unwrap();
    let report = admin(channel.clone())
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.reloaded, ["providers.openai.api_keys"]);
    mock.accept_keys(Some(&[new]));
    wait_for(new, 30).await;

    // Once more through the SIGHUP path, back to the old key.
    mock.accept_keys(Some(&[old, new]));
    std::fs::write(&key_file, format!("{old}\n")).unwrap();
    let before = stats.requests_with_key(old);
    gateway.reload.notify_one();
    wait_for(old, before + 30).await;
    mock.accept_keys(Some(&[old]));
    let ok_before = ok.load(Ordering::SeqCst);
    while ok.load(Ordering::SeqCst) < ok_before + 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    stop.store(true, Ordering::SeqCst);
    while workers.join_next().await.is_some() {}
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "calls failed during rotation: {failures:?}"
    );
    let auth = stats.last_headers().unwrap()["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(auth, format!("Bearer {old}"));
    gateway.stop().await;

    let logs = logs.text();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert!(
        !logs.contains("ROTATED"),
        "a key leaked into the logs:\n{logs}"
    );
}

#[tokio::test]
async fn reload_reports_what_needs_a_restart_and_refuses_invalid_configs() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, provider_toml(&mock, "api_key = \"sk-one-SECRET\"")).unwrap();
    let gateway = Running::start(&config).await;
    let mut admin = admin(gateway.plain().await);

    std::fs::write(
        &config,
        format!(
            "{}\n[providers.extra]\nkind = \"mock\"\n",
            provider_toml(&mock, "api_keys = [\"sk-one-SECRET\", \"sk-two-SECRET\"]")
        ),
    )
    .unwrap();
    let report = admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.reloaded, ["providers.openai.api_keys"]);
    assert_eq!(report.restart_needed, ["providers.extra (added)"]);
    assert!(!format!("{report:?}").contains("SECRET"));

    // A syntax error on a line holding a key: refused, and the key is not echoed.
    std::fs::write(
        &config,
        provider_toml(&mock, "api_key = \"sk-one-SECRET\" oops"),
    )
    .unwrap();
    let status = admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&status), "CONFIG_INVALID");
    assert!(status.message().contains("line"), "{status:?}");
    assert!(!status.message().contains("SECRET"), "{status:?}");
    // The running keys still work.
    LlmGatewayClient::new(gateway.plain().await)
        .chat(request("openai/gpt-4o-mini", "hi"))
        .await
        .unwrap();
    gateway.stop().await;
}
