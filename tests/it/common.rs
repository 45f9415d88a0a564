//! Test harness: start the gateway on 127.0.0.1:0 with a TOML config, build clients.

use std::{path::Path, time::Duration};

use llm_gateway::{
    config::{Config, Overrides},
    mock_upstream::{MockSettings, MockUpstream},
    pb::{self, llm_gateway_client::LlmGatewayClient},
    server::{self, ServeError},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The admin token of test gateways.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A running gateway.
pub struct Gateway {
    pub channel: Channel,
    /// The gateway's address.
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Gateway {
    /// Starts a gateway with this TOML config (no env lookups). Unless the config has a
    /// `[store]` section, the store is in memory; the admin token is [`ADMIN_TOKEN`].
    pub async fn start(toml: &str) -> Gateway {
        Self::start_config(Self::config(toml)).await
    }

    /// Like [`Gateway::start`], without connecting first (the channel connects lazily).
    pub async fn start_unconnected(toml: &str) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::run(Self::config(toml), listener, async {
            let _ = rx.await;
        }));
        Gateway {
            channel: Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy(),
            addr,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// The config [`Gateway::start`] runs with.
    pub fn config(toml: &str) -> Config {
        let mut config =
            Config::from_toml(toml, Path::new("test.toml"), &Overrides::default(), &|_| {
                None
            })
            .expect("valid test config");
        if !toml.contains("[store]") {
            config.store.path = ":memory:".into();
        }
        if config.admin.token.is_none() {
            config.admin.token = Some(ADMIN_TOKEN.to_owned());
        }
        if !toml.contains("[metrics]") {
            config.metrics.listen = None;
        }
        if !toml.contains("[http]") {
            config.http.listen = None;
        }
        config
    }

    /// Like [`Gateway::start`], with the HTTP front on its own 127.0.0.1:0 listener; returns
    /// the front's base URL (`http://127.0.0.1:PORT`).
    pub async fn start_http(toml: &str) -> (Gateway, String) {
        let mut config =
            Config::from_toml(toml, Path::new("test.toml"), &Overrides::default(), &|_| {
                None
            })
            .expect("valid test config");
        config.store.path = ":memory:".into();
        config.admin.token = Some(ADMIN_TOKEN.to_owned());
        config.metrics.listen = None;
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", http.local_addr().unwrap());
        let options = server::ServeOptions {
            http_listener: Some(http),
            ..Default::default()
        };
        (Self::start_with(config, options).await, base)
    }

    /// Starts a gateway with a config.
    pub async fn start_config(config: Config) -> Gateway {
        Self::start_with(config, server::ServeOptions::default()).await
    }

    /// Starts a gateway with a config and serve options.
    pub async fn start_with(config: Config, options: server::ServeOptions) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::run_with(
            config,
            listener,
            async {
                let _ = rx.await;
            },
            options,
        ));
        let connect = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await;
        let channel = match connect {
            Ok(channel) => channel,
            Err(err) if handle.is_finished() => {
                panic!(
                    "the gateway stopped at startup: {:?} (connect: {err})",
                    handle.await
                )
            }
            Err(err) => panic!("cannot connect to the gateway: {err}"),
        };
        Gateway {
            channel,
            addr,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn client(&self) -> LlmGatewayClient<Channel> {
        LlmGatewayClient::new(self.channel.clone())
    }

    /// Sends the shutdown signal.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// The server task, to await after `signal_shutdown`.
    pub fn take_handle(&mut self) -> JoinHandle<Result<(), ServeError>> {
        self.handle.take().unwrap()
    }
}

/// A gateway config with one OpenAI-compatible provider `openai` pointing at `mock`.
pub fn openai_toml(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
[server]
shutdown_grace = "5s"
# Answer well before the test client's own deadline timer, even on a loaded machine.
deadline_margin = "250ms"
[upstream]
stream_idle_timeout = "2s"
[providers.openai]
kind = "openai"
base_url = "{}"
api_key = "sk-test-secret"
{extra}
"#,
        mock.openai_base_url()
    )
}

/// Starts the `llm-gateway` binary as a child process with `toml` (its config file in
/// `dir`, no HTTP listener); returns it (killed when dropped) and a channel to it.
pub async fn gateway_process(dir: &Path, toml: &str) -> (tokio::process::Child, Channel) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config_path = dir.join(format!("gateway-{port}.toml"));
    std::fs::write(&config_path, format!("{toml}\n[http]\nlisten = \"off\"\n")).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway"))
        .arg("--config")
        .arg(&config_path)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin-token")
        .arg(ADMIN_TOKEN)
        .arg("--log-level")
        .arg("warn")
        .arg("--metrics-listen")
        .arg("off")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A debug binary on a loaded machine takes a while (up to 40 s here).
    for _ in 0..800 {
        if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return (child, channel);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway process did not start");
}

/// A mock upstream and a gateway in front of it.
pub async fn openai_pair() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&openai_toml(&mock, "")).await;
    (mock, gateway)
}

pub fn user(text: &str) -> pb::Message {
    pb::Message {
        role: pb::Role::User as i32,
        content: vec![pb::ContentPart {
            part: Some(pb::content_part::Part::Text(text.to_owned())),
        }],
        name: String::new(),
    }
}

pub fn request(model: &str, text: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        model: model.to_owned(),
        messages: vec![user(text)],
        ..Default::default()
    }
}

pub fn weather_tool() -> pb::Tool {
    let mut params = prost_types::Struct::default();
    params.fields.insert(
        "type".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("object".into())),
        },
    );
    pb::Tool {
        name: "get_weather".into(),
        description: "current weather".into(),
        parameters: Some(params),
        strict: false,
    }
}

/// The text parts of a reply, concatenated.
pub fn reply_text(response: &pb::ChatResponse) -> String {
    response
        .message
        .as_ref()
        .map(|m| {
            m.content
                .iter()
                .filter_map(|p| match &p.part {
                    Some(pb::content_part::Part::Text(t)) => Some(t.as_str()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// All events of a stream, and its final status (Ok when it ended cleanly).
pub async fn collect_stream(
    mut stream: tonic::Streaming<pb::ChatStreamResponse>,
) -> (
    Vec<pb::chat_stream_response::Event>,
    Result<(), tonic::Status>,
) {
    let mut events = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => events.push(msg.event.expect("event set")),
            Ok(None) => return (events, Ok(())),
            Err(status) => return (events, Err(status)),
        }
    }
}

/// The field paths of a BadRequest detail.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// The ErrorInfo reason.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// A gateway config with one provider of each wire format in front of `mock`: `openai`,
/// `anthropic`, `gemini` and `azure` (each with its own fake key).
pub fn all_providers_toml(mock: &MockUpstream, extra: &str) -> String {
    format!(
        r#"
[server]
shutdown_grace = "5s"
deadline_margin = "250ms"
[upstream]
stream_idle_timeout = "2s"
[providers.openai]
kind = "openai"
base_url = "{openai}"
api_key = "sk-test-secret"
[providers.anthropic]
kind = "anthropic"
base_url = "{anthropic}"
api_key = "sk-ant-test-secret"
[providers.gemini]
kind = "gemini"
base_url = "{gemini}"
api_key = "gemini-test-secret"
[providers.azure]
kind = "azure"
base_url = "{azure}"
api_key = "azure-test-secret"
{extra}
"#,
        openai = mock.openai_base_url(),
        anthropic = mock.anthropic_base_url(),
        gemini = mock.gemini_base_url(),
        azure = mock.azure_endpoint(),
    )
}

/// A mock upstream and a gateway with every provider kind in front of it.
pub async fn all_providers_pair() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start(MockSettings::default()).await.unwrap();
    let gateway = Gateway::start(&all_providers_toml(&mock, "")).await;
    (mock, gateway)
}

/// An admin client that sends the test admin token.
pub type Admin = llm_gateway::pb::llm_gateway_admin_client::LlmGatewayAdminClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn with_admin_token(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    Ok(req)
}

/// An admin client over `channel` with the test admin token.
pub fn admin_client(channel: Channel) -> Admin {
    llm_gateway::pb::llm_gateway_admin_client::LlmGatewayAdminClient::with_interceptor(
        channel,
        with_admin_token as fn(_) -> _,
    )
}

/// A system message with one text part.
pub fn system(text: &str) -> pb::Message {
    pb::Message {
        role: pb::Role::System as i32,
        content: vec![pb::ContentPart {
            part: Some(pb::content_part::Part::Text(text.to_owned())),
        }],
        name: String::new(),
    }
}

/// The registry's cost of a call to `provider/model` with this usage.
pub fn registry_cost(model: &str, input: u64, output: u64) -> f64 {
    let (provider, name) = model.split_once('/').unwrap();
    let prices = llm_gateway::models::ModelRegistry::builtin()
        .unwrap()
        .get(provider, name)
        .unwrap_or_else(|| panic!("{model} is not in the registry"))
        .prices
        .unwrap();
    input as f64 * prices.input / 1e6 + output as f64 * prices.output / 1e6
}

/// The text deltas of a stream, concatenated.
pub fn text_of(events: &[pb::chat_stream_response::Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            pb::chat_stream_response::Event::Delta(pb::ContentDelta {
                delta: Some(pb::content_delta::Delta::Text(t)),
            }) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

/// The tool-call deltas of a stream.
pub fn tool_deltas(events: &[pb::chat_stream_response::Event]) -> Vec<&pb::ToolCallDelta> {
    events
        .iter()
        .filter_map(|e| match e {
            pb::chat_stream_response::Event::Delta(pb::ContentDelta {
                delta: Some(pb::content_delta::Delta::ToolCall(d)),
            }) => Some(d),
            _ => None,
        })
        .collect()
}

/// The tool calls of a reply.
pub fn tool_calls(response: &pb::ChatResponse) -> Vec<&pb::ToolCall> {
    response
        .message
        .as_ref()
        .unwrap()
        .content
        .iter()
        .filter_map(|p| match &p.part {
            Some(pb::content_part::Part::ToolCall(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// A stream's events and final status.
pub async fn stream(
    gateway: &Gateway,
    req: pb::ChatRequest,
) -> (
    Vec<pb::chat_stream_response::Event>,
    Result<(), tonic::Status>,
) {
    let stream = gateway
        .client()
        .chat_stream(req)
        .await
        .unwrap()
        .into_inner();
    collect_stream(stream).await
}

/// The gateway's `ListModels` answer.
pub async fn list_models(gateway: &Gateway) -> pb::ListModelsResponse {
    gateway
        .client()
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// A codec that sends and receives message bytes as they are, to call any RPC by path with
/// any payload (including bytes that are no valid message).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls the RPC at `path` (any kind: unary or streaming) with one request message of raw
/// `payload` bytes and `authorization: Bearer <bearer>` when given. Ok once the first response
/// message (or a clean end) arrives; the status otherwise.
pub async fn raw_call(
    channel: &Channel,
    path: &str,
    payload: bytes::Bytes,
    bearer: Option<&str>,
) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(futures_util::stream::once(async move { payload }));
    if let Some(secret) = bearer {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    }
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    let mut stream = grpc.streaming(req, path, RawCodec).await?.into_inner();
    stream.message().await.map(|_| ())
}

/// Every usage record in the ledger once at least `at_least` are there (the ledger writes in
/// the background: polls, bounded).
pub async fn usage_records(admin: &mut Admin, at_least: usize) -> Vec<pb::UsageRecord> {
    let mut records = Vec::new();
    for _ in 0..200 {
        let mut export = admin
            .export_usage(pb::ExportUsageRequest::default())
            .await
            .unwrap()
            .into_inner();
        records.clear();
        while let Some(batch) = export.message().await.unwrap() {
            records.extend(batch.records);
        }
        if records.len() >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    records
}

/// Creates `key` through the Admin API; its secret.
pub async fn create_key_secret(admin: &mut Admin, key: pb::Key) -> String {
    admin
        .create_key(pb::CreateKeyRequest { key: Some(key) })
        .await
        .unwrap()
        .into_inner()
        .secret
}

/// What key `name` spent today, as GetKey reports it.
pub async fn spent_today_usd(admin: &mut Admin, name: &str) -> f64 {
    admin
        .get_key(pb::GetKeyRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .spent_today_usd
}

/// Unix ms now.
pub(crate) fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}
