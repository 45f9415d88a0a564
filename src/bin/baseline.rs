//! `llm-gateway-baseline`: the bare baseline of the benchmarks. A minimal tonic server for
//! `llmgateway.v1.LlmGateway` that forwards `Chat` and `ChatStream` to one OpenAI-compatible
//! endpoint (the mock) with one shared reqwest client, and converts the answer: no routing,
//! validation, deadlines, metrics or logging.
//!
//! It does the work any gRPC-to-HTTP forwarder of this stack must do (decode the call,
//! serialize a JSON request, parse the JSON answer or the SSE chunks, encode the reply), so it
//! is the physical limit of tonic + hyper + reqwest + serde on this machine; the gateway is
//! measured against it. Nothing here is for production use.

use std::{borrow::Cow, collections::VecDeque, pin::Pin, process::ExitCode, time::Duration};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use futures_util::{Stream, StreamExt};
use llm_gateway::pb::{
    self, chat_stream_response::Event, content_delta::Delta, llm_gateway_server::LlmGateway,
    llm_gateway_server::LlmGatewayServer,
};
use serde::{Deserialize, Serialize};
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

/// The bare baseline: a minimal gRPC-to-OpenAI forwarder, for benchmarks only.
#[derive(Debug, Parser)]
#[command(name = "llm-gateway-baseline", version, about)]
struct Args {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: String,
    /// Base URL of the OpenAI-compatible upstream (the mock).
    #[arg(long, default_value = "http://127.0.0.1:8089/v1")]
    upstream: String,
    /// Speak HTTP/2 without negotiation (h2c) to the upstream, as the gateway does for a
    /// provider with `http2_prior_knowledge`.
    #[arg(long)]
    upstream_h2c: bool,
    /// Answer every call at once with RESOURCE_EXHAUSTED, without calling the upstream: the
    /// floor of a refusal on this stack (tonic + hyper on this machine), which
    /// bench/overload.sh measures beside the gateway's refusals.
    #[arg(long)]
    refuse_all: bool,
}

// ---------------------------------------------------------------------------------------------
// OpenAI wire format, the minimum
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: Cow<'a, str>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: String,
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireAnswer,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireAnswer {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
}

fn role(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::System) => "system",
        Ok(pb::Role::Developer) => "developer",
        Ok(pb::Role::Assistant) => "assistant",
        Ok(pb::Role::Tool) => "tool",
        _ => "user",
    }
}

fn wire_request(req: &pb::ChatRequest, stream: bool) -> WireRequest<'_> {
    let model = req.model.split_once('/').map_or(&*req.model, |(_, m)| m);
    WireRequest {
        model,
        messages: req
            .messages
            .iter()
            .map(|m| WireMessage {
                role: role(m.role),
                content: {
                    let mut texts = m.content.iter().filter_map(|p| match &p.part {
                        Some(pb::content_part::Part::Text(t)) => Some(t.as_str()),
                        _ => None,
                    });
                    match (texts.next(), texts.next()) {
                        (Some(one), None) => Cow::Borrowed(one),
                        (first, second) => {
                            Cow::Owned(first.into_iter().chain(second).chain(texts).collect())
                        }
                    }
                },
            })
            .collect(),
        stream,
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
    }
}

fn finish_reason(reason: Option<&str>) -> i32 {
    (match reason {
        Some("stop") => pb::FinishReason::Stop,
        Some("length") => pb::FinishReason::Length,
        Some("tool_calls") => pb::FinishReason::ToolCalls,
        Some(_) => pb::FinishReason::Other,
        None => pb::FinishReason::Unspecified,
    }) as i32
}

fn usage(u: Option<WireUsage>) -> Option<pb::Usage> {
    let u = u?;
    Some(pb::Usage {
        input_tokens: u.prompt_tokens,
        output_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        source: pb::UsageSource::Provider as i32,
        ..pb::Usage::default()
    })
}

fn unavailable(what: &str) -> Status {
    Status::unavailable(what.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------

struct Baseline {
    client: reqwest::Client,
    url: String,
    refuse_all: bool,
}

impl Baseline {
    async fn send(&self, body: Vec<u8>) -> Result<reqwest::Response, Status> {
        let response = self
            .client
            .post(&self.url)
            .bearer_auth("baseline")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|_| unavailable("upstream unreachable"))?;
        if !response.status().is_success() {
            return Err(unavailable("upstream error status"));
        }
        Ok(response)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ChatStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LlmGateway for Baseline {
    async fn chat(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        if self.refuse_all {
            return Err(Status::resource_exhausted(
                "the baseline refuses every call",
            ));
        }
        let req = request.into_inner();
        let body = serde_json::to_vec(&wire_request(&req, false))
            .map_err(|_| Status::internal("cannot encode"))?;
        let bytes = self
            .send(body)
            .await?
            .bytes()
            .await
            .map_err(|_| unavailable("upstream body cut off"))?;
        let wire: WireResponse =
            serde_json::from_slice(&bytes).map_err(|_| unavailable("invalid upstream body"))?;
        let choice = wire
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| unavailable("no choices"))?;
        let content = choice
            .message
            .content
            .map(|t| pb::ContentPart {
                part: Some(pb::content_part::Part::Text(t)),
            })
            .into_iter()
            .collect();
        Ok(Response::new(pb::ChatResponse {
            provider: "openai".to_owned(),
            model: wire.model,
            message: Some(pb::Message {
                role: pb::Role::Assistant as i32,
                content,
                name: String::new(),
            }),
            finish_reason: finish_reason(choice.finish_reason.as_deref()),
            usage: usage(wire.usage),
            ..pb::ChatResponse::default()
        }))
    }

    type ChatStreamStream = EventStream;

    async fn chat_stream(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let req = request.into_inner();
        let wire = wire_request(&req, true);
        let body = serde_json::to_vec(&wire).map_err(|_| Status::internal("cannot encode"))?;
        let model = wire.model.to_owned();
        let response = self.send(body).await?;
        let mut state = SseState {
            body: Box::pin(response.bytes_stream()),
            buf: BytesMut::new(),
            out: VecDeque::new(),
            finish: None,
            usage: None,
            ended: false,
        };
        state.out.push_back(Event::Start(pb::StreamStart {
            id: String::new(),
            provider: "openai".to_owned(),
            model,
        }));
        let events = futures_util::stream::unfold(state, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse::default()))
    }

    /// Not part of the baseline's benchmarks.
    async fn embed(
        &self,
        _request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        Err(Status::unimplemented("the baseline forwards chat only"))
    }

    async fn create_batch(
        &self,
        _request: Request<pb::CreateBatchRequest>,
    ) -> Result<Response<pb::CreateBatchResponse>, Status> {
        Err(no_batches())
    }

    async fn get_batch(
        &self,
        _request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::GetBatchResponse>, Status> {
        Err(no_batches())
    }

    type StreamBatchResultsStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamBatchResultsResponse, Status>> + Send>>;

    async fn stream_batch_results(
        &self,
        _request: Request<pb::StreamBatchResultsRequest>,
    ) -> Result<Response<Self::StreamBatchResultsStream>, Status> {
        Err(no_batches())
    }

    async fn cancel_batch(
        &self,
        _request: Request<pb::CancelBatchRequest>,
    ) -> Result<Response<pb::CancelBatchResponse>, Status> {
        Err(no_batches())
    }

    async fn list_batches(
        &self,
        _request: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        Err(no_batches())
    }
}

/// The baseline forwards chat only.
fn no_batches() -> Status {
    Status::unimplemented("the baseline has no batch jobs")
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The SSE body of one stream, turned into stream events.
struct SseState {
    body: Body,
    buf: BytesMut,
    out: VecDeque<Event>,
    finish: Option<String>,
    usage: Option<WireUsage>,
    ended: bool,
}

impl SseState {
    /// The next event; `None` after the finish or an error.
    async fn next(&mut self) -> Option<Result<pb::ChatStreamResponse, Status>> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Some(Ok(pb::ChatStreamResponse { event: Some(event) }));
            }
            if self.ended {
                return None;
            }
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event = self.buf.split_to(end + 2);
                if let Err(status) = self.event(&event) {
                    self.ended = true;
                    return Some(Err(status));
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(_)) | None => {
                    self.ended = true;
                    return Some(Err(unavailable("upstream stream broken")));
                }
            }
        }
    }

    fn event(&mut self, event: &[u8]) -> Result<(), Status> {
        for line in event.split(|&b| b == b'\n') {
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            if data == b"[DONE]" {
                self.ended = true;
                self.out.push_back(Event::Finish(pb::StreamFinish {
                    finish_reason: finish_reason(self.finish.as_deref()),
                    usage: usage(self.usage),
                    ..pb::StreamFinish::default()
                }));
                return Ok(());
            }
            let chunk: WireChunk =
                serde_json::from_slice(data).map_err(|_| unavailable("invalid upstream event"))?;
            for choice in chunk.choices {
                if let Some(text) = choice
                    .delta
                    .and_then(|d| d.content)
                    .filter(|t| !t.is_empty())
                {
                    self.out.push_back(Event::Delta(pb::ContentDelta {
                        delta: Some(Delta::Text(text)),
                    }));
                }
                if choice.finish_reason.is_some() {
                    self.finish = choice.finish_reason;
                }
            }
            if chunk.usage.is_some() {
                self.usage = chunk.usage;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

#[expect(
    clippy::print_stderr,
    reason = "reports the address and startup problems to the terminal"
)]
#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // The same client settings as the gateway's: pooled, no-delay, rustls with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256);
    if args.upstream_h2c {
        builder = builder.http2_prior_knowledge();
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llm-gateway-baseline: cannot build the http client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "llm-gateway-baseline: cannot listen on {}: {e}",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let service = Baseline {
        client,
        url: format!("{}/chat/completions", args.upstream.trim_end_matches('/')),
        refuse_all: args.refuse_all,
    };
    eprintln!(
        "llm-gateway-baseline listening on {addr}, upstream {}",
        service.url
    );
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself; on an incoming
    // stream the option must be set here, or Nagle holds back stream messages (~40 ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = Server::builder()
        .add_service(LlmGatewayServer::new(service))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-gateway-baseline: {e}");
            ExitCode::FAILURE
        }
    }
}
