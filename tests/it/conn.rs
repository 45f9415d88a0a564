//! The front door under abuse and at shutdown: raw sockets against the connection limits, a
//! health Watch during the drain. Timeouts here are small real durations; each test waits for
//! the gateway to act (bounded so a regression fails instead of hanging) and never asserts
//! how fast.

use std::time::Duration;

use llm_gateway::{
    mock_upstream::{MockSettings, MockUpstream},
    pb::chat_stream_response::Event,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::common::*;

/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty SETTINGS frame.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Long enough for any loaded machine; a connection the gateway forgets hits it.
const BOUND: Duration = Duration::from_secs(30);

fn addr(gateway: &Gateway) -> String {
    gateway.addr.to_string()
}

/// Reads until the gateway closes the connection (end of input or reset); returns the bytes
/// it sent before.
async fn read_until_closed(conn: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway kept the connection open");
    got
}

fn metric(name_and_labels: &str) -> f64 {
    let text = llm_gateway::telemetry::metrics_handle()
        .expect("metrics recorder")
        .render();
    text.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn gateway_with(connections: &str) -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(
        &mock,
        &format!("[connections]\n{connections}"),
    ))
    .await;
    (mock, gateway)
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_handshake_timeout() {
    let (_mock, gateway) = gateway_with("handshake_timeout = \"200ms\"").await;
    let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
    let sent = read_until_closed(&mut conn).await;
    assert!(sent.is_empty(), "nothing is sent before the preface");
}

#[tokio::test]
async fn half_a_preface_is_closed_at_the_handshake_timeout() {
    let (_mock, gateway) = gateway_with("handshake_timeout = \"200ms\"").await;
    let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
    conn.write_all(&PREFACE[..12]).await.unwrap();
    read_until_closed(&mut conn).await;
    // A preface without its SETTINGS frame is no better.
    let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
    conn.write_all(PREFACE).await.unwrap();
    read_until_closed(&mut conn).await;
}

#[tokio::test]
async fn bytes_that_are_neither_http2_nor_http1_are_refused_during_the_handshake() {
    // (HTTP/1.1 requests go to the console on this listener; tests/it/console.rs checks
    // that they are refused like this with `admin.console = false`.)
    let (_mock, gateway) = gateway_with("handshake_timeout = \"1h\"").await;
    let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
    // A TLS ClientHello's first bytes on a plain-text listener.
    conn.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        .await
        .unwrap();
    read_until_closed(&mut conn).await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_settings() {
    // The handshake limit is far away: only the idle limit can close it.
    let (_mock, gateway) =
        gateway_with("handshake_timeout = \"1h\"\nidle_timeout = \"200ms\"").await;
    let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
    conn.write_all(PREFACE).await.unwrap();
    conn.write_all(&EMPTY_SETTINGS).await.unwrap();
    let sent = read_until_closed(&mut conn).await;
    // The gateway answered as an HTTP/2 server (its SETTINGS frame) before it closed.
    assert!(
        sent.len() >= 9 && sent[3] == 4,
        "no SETTINGS from the gateway: {sent:?}"
    );
    assert!(
        metric("llm_gateway_connections_closed_total{listener=\"grpc\",reason=\"idle\"}") >= 1.0
    );
}

#[tokio::test]
async fn a_connection_past_max_age_gets_a_goaway() {
    let (_mock, gateway) = gateway_with(
        "handshake_timeout = \"1h\"\nmax_connection_age = \"1s\"\nmax_connection_age_grace = \"1h\"",
    )
    .await;
    let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
    conn.write_all(PREFACE).await.unwrap();
    conn.write_all(&EMPTY_SETTINGS).await.unwrap();
    // Frames until a GOAWAY (type 7): the client is told to reconnect.
    let goaway = tokio::time::timeout(BOUND, async {
        loop {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await.unwrap();
            if head[3] == 7 {
                return payload;
            }
        }
    })
    .await
    .expect("a GOAWAY at the maximum age");
    // Error code NO_ERROR: a graceful rebalance, not a failure.
    assert_eq!(&goaway[4..8], &[0, 0, 0, 0]);
    tokio::time::timeout(BOUND, async {
        while metric("llm_gateway_connections_closed_total{listener=\"grpc\",reason=\"max_age\"}")
            < 1.0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the age is counted");
}

#[tokio::test]
async fn an_open_stream_is_not_idle() {
    let (_mock, gateway) = gateway_with("idle_timeout = \"100ms\"").await;
    // Ten chunks 100 ms apart: the stream outlives the idle limit several times over.
    let stream = gateway
        .client()
        .chat_stream(request(
            "openai/gpt-4o-mini+chunks=10+chunk_delay=100",
            "keep me",
        ))
        .await
        .unwrap()
        .into_inner();
    let (events, status) = collect_stream(stream).await;
    status.expect("the stream completes on its connection");
    assert!(matches!(events.last(), Some(Event::Finish(_))));
}

#[tokio::test]
async fn past_max_connections_new_connections_are_refused_at_once() {
    // The test client's channel holds one of the two.
    let (_mock, gateway) = gateway_with("max_connections = 2\nhandshake_timeout = \"1h\"").await;
    let mut second = TcpStream::connect(addr(&gateway)).await.unwrap();
    second.write_all(PREFACE).await.unwrap();
    second.write_all(&EMPTY_SETTINGS).await.unwrap();
    let mut settings = [0u8; 9];
    second.read_exact(&mut settings).await.unwrap();
    assert_eq!(settings[3], 4, "the second connection is served");

    let refused_before = metric("llm_gateway_connections_refused_total{listener=\"grpc\"}");
    let mut third = TcpStream::connect(addr(&gateway)).await.unwrap();
    let sent = read_until_closed(&mut third).await;
    assert!(sent.is_empty());
    assert!(metric("llm_gateway_connections_refused_total{listener=\"grpc\"}") > refused_before);
    // The client's connection still works.
    gateway
        .client()
        .chat(request("openai/gpt-4o-mini", "still served"))
        .await
        .unwrap();

    // Once one closes, a new connection gets its slot.
    drop(second);
    let served = tokio::time::timeout(BOUND, async {
        loop {
            let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
            conn.write_all(PREFACE).await.unwrap();
            conn.write_all(&EMPTY_SETTINGS).await.unwrap();
            let mut head = [0u8; 9];
            if conn.read_exact(&mut head).await.is_ok() {
                return head;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a slot frees up");
    assert_eq!(served[3], 4);
}

#[tokio::test]
async fn a_tls_connection_that_never_handshakes_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("server.crt"), cert.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("server.key"),
        cert.signing_key.serialize_pem(),
    )
    .unwrap();
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let toml = openai_toml(
        &mock,
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[connections]\nhandshake_timeout = \"200ms\"\n",
            dir.path().join("server.crt").display(),
            dir.path().join("server.key").display()
        ),
    );
    let gateway = Gateway::start_unconnected(&toml).await;
    // A ClientHello that never comes.
    let mut conn = TcpStream::connect(addr(&gateway)).await.unwrap();
    read_until_closed(&mut conn).await;
    assert!(
        metric(
            "llm_gateway_connections_closed_total{listener=\"grpc\",reason=\"handshake_timeout\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn shutdown_ends_an_open_health_watch_and_exits_when_the_calls_are_done() {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    // A grace far longer than the test bound: exiting within the bound means the Watch did
    // not hold the shutdown.
    let toml = openai_toml(&mock, "").replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1h\"");
    let mut gateway = Gateway::start(&toml).await;
    let mut watch = HealthClient::new(gateway.channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let call = gateway
        .client()
        .chat_stream(request(
            "openai/gpt-4o-mini+chunks=5+chunk_delay=50",
            "drain me",
        ))
        .await
        .unwrap()
        .into_inner();
    let call = tokio::spawn(collect_stream(call));

    gateway.signal_shutdown();
    let handle = gateway.take_handle();
    // The Watch sees NOT_SERVING, then ends.
    let mut statuses = Vec::new();
    let end = loop {
        match watch.message().await {
            Ok(Some(m)) => statuses.push(m.status),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(statuses.last(), Some(&(ServingStatus::NotServing as i32)));
    let end = end.expect("the watch ends with a status");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    let (events, status) = call.await.unwrap();
    status.expect("the call in flight completes");
    assert!(matches!(events.last(), Some(Event::Finish(_))));
    tokio::time::timeout(BOUND, handle)
        .await
        .expect("the gateway exits once the calls are done, long before the grace")
        .unwrap()
        .unwrap();
}

/// Fills a spawned gateway's descriptor budget (a low `ulimit -n`) with idle connections,
/// then calls: the upstream connects fail for lack of descriptors, which is the gateway's own
/// fault. Callers get UNAVAILABLE with RetryInfo, and no target's circuit opens.
#[tokio::test]
async fn out_of_descriptors_never_opens_a_targets_circuit() {
    use tokio::io::AsyncBufReadExt as _;

    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[providers.openai]
kind = "openai"
base_url = "{}"
api_key = "sk-test"
[store]
path = ":memory:"
[health]
failure_threshold = 2
[connections]
handshake_timeout = "1h"
max_connections = 100000
[http]
listen = "off"
"#,
            mock.openai_base_url()
        ),
    )
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gateway_addr = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_llm-gateway"))
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(&gateway_addr)
        .arg("--admin-token")
        .arg(ADMIN_TOKEN)
        .arg("--log-level")
        .arg("warn")
        .arg("--log-format")
        .arg("text")
        .arg("--metrics-listen")
        .arg("off")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut channel = None;
    for _ in 0..400 {
        if let Ok(c) = tonic::transport::Channel::from_shared(format!("http://{gateway_addr}"))
            .unwrap()
            .connect()
            .await
        {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let channel = channel.expect("the gateway process started");

    // More idle HTTP/2 connections than the gateway has descriptors; the rest wait in the
    // backlog, so the gateway stays out of descriptors while they are open.
    let mut idle = Vec::new();
    for _ in 0..100 {
        let mut conn = TcpStream::connect(&gateway_addr).await.unwrap();
        conn.write_all(PREFACE).await.unwrap();
        conn.write_all(&EMPTY_SETTINGS).await.unwrap();
        idle.push(conn);
    }
    tokio::time::timeout(BOUND, async {
        while let Some(line) = log.next_line().await.unwrap() {
            // stderr is a pipe here: text logs without colour codes.
            assert!(
                !line.contains('\u{1b}'),
                "ANSI escape in a piped log: {line:?}"
            );
            if line.contains("pausing accept") {
                return;
            }
        }
        panic!("the gateway exited");
    })
    .await
    .expect("the gateway ran out of descriptors and paused accepting");
    // Keep draining the log so the gateway never blocks on a full pipe.
    let drain_log = tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let mut client = llm_gateway::pb::llm_gateway_client::LlmGatewayClient::new(channel.clone());
    for _ in 0..5 {
        let status = client
            .chat(request("openai/gpt-4o-mini", "no descriptor for me"))
            .await
            .expect_err("no descriptor for the upstream connection");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "LOCAL_RESOURCE", "{status:?}");
        let details = tonic_types::StatusExt::get_error_details(&status);
        assert!(details.retry_info().is_some(), "RetryInfo: {status:?}");
    }
    let targets = admin_client(channel.clone())
        .list_providers(llm_gateway::pb::ListProvidersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .targets;
    assert!(!targets.is_empty(), "the target was tried");
    for t in &targets {
        assert_eq!(
            t.circuit,
            llm_gateway::pb::CircuitState::Closed as i32,
            "{t:?}"
        );
        assert_eq!(t.error_rate, 0.0, "{t:?}");
    }

    // With the descriptors back, the same target serves at once.
    drop(idle);
    let answer = tokio::time::timeout(BOUND, async {
        loop {
            match client.chat(request("openai/gpt-4o-mini", "now?")).await {
                Ok(answer) => return answer.into_inner(),
                Err(status) => {
                    assert_eq!(reason(&status), "LOCAL_RESOURCE", "{status:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await
    .expect("served once descriptors are free");
    assert_eq!(answer.provider, "openai");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    drain_log.abort();
}

/// Twenty streams at once, each ~1 s long, through a gateway whose provider speaks HTTP/1.1
/// or, with `http2_prior_knowledge`, HTTP/2 (h2c): how many upstream connections they took.
async fn upstream_connections_for_overlapping_streams(
    provider: &str,
    streams_per_connection: usize,
) -> u64 {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let toml = openai_toml(&mock, provider).replace(
        "[upstream]\n",
        &format!("[upstream]\nstreams_per_connection = {streams_per_connection}\n"),
    );
    let gateway = Gateway::start(&toml).await;
    let calls = (0..20).map(|i| {
        let mut client = gateway.client();
        async move {
            let stream = client
                .chat_stream(request(
                    "openai/gpt-4o-mini+chunks=10+chunk_delay=100",
                    &format!("stream {i}"),
                ))
                .await
                .unwrap()
                .into_inner();
            let (events, status) = collect_stream(stream).await;
            status.expect("the stream completes");
            assert!(matches!(events.last(), Some(Event::Finish(_))));
        }
    });
    futures_util::future::join_all(calls).await;
    mock.stats().connections()
}

#[tokio::test]
async fn h2c_providers_multiplex_concurrent_calls_on_one_connection() {
    let h1 = upstream_connections_for_overlapping_streams("", 100).await;
    let h2c =
        upstream_connections_for_overlapping_streams("http2_prior_knowledge = true", 100).await;
    assert_eq!(h2c, 1, "every stream shares the one HTTP/2 connection");
    // Over HTTP/1.1 a stream holds its connection to the end, so overlapping ones need more.
    assert!(h1 > 1, "HTTP/1.1 took {h1} connection(s)");
}

#[tokio::test]
async fn past_streams_per_connection_h2c_calls_open_another_connection() {
    // Twenty overlapping streams, five per connection: four connections, none waiting for
    // a stream of another to end.
    let connections =
        upstream_connections_for_overlapping_streams("http2_prior_knowledge = true", 5).await;
    assert_eq!(connections, 4);
}
