//! The exact cache key: a SHA-256 over a canonical, length-prefixed encoding of everything
//! that changes the answer (the namespace, the model or policy and its version, the
//! messages, tools, tool choice, sampling parameters and response format), and nothing that
//! does not (request id, trace context, attribution tags, `user`, deadline).
//!
//! The encoding is stable across processes and builds (no random hasher state), so replicas
//! sharing a store compute the same key for the same request.

use ring::digest::{Context, SHA256};

use crate::types::{
    ChatRequest, ContentPart, ImageDetail, ImageSource, ResponseFormat, Role, SamplingParams,
    ToolChoice,
};

/// The key of one cached reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The tenant namespace (also part of the digest).
    pub namespace: std::sync::Arc<str>,
    /// SHA-256 of the canonical request.
    pub digest: [u8; 32],
}

impl CacheKey {
    /// The digest as lowercase hex (shared-store keys).
    pub fn hex(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(64);
        for b in self.digest {
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

/// Feeds typed, length-prefixed fields to the digest, so no two different requests encode
/// to the same bytes.
struct Canon(Context);

impl Canon {
    fn tag(&mut self, tag: u8) {
        self.0.update(&[tag]);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.tag(0),
            Some(s) => {
                self.tag(1);
                self.str(s);
            }
        }
    }
    fn u64(&mut self, v: u64) {
        self.0.update(&v.to_le_bytes());
    }
    fn opt_f64(&mut self, v: Option<f64>) {
        match v {
            None => self.tag(0),
            Some(v) => {
                self.tag(1);
                // -0.0 and 0.0 mean the same parameter.
                let v = if v == 0.0 { 0.0 } else { v };
                self.u64(v.to_bits());
            }
        }
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.tag(0),
            Some(v) => {
                self.tag(1);
                self.u64(v);
            }
        }
    }
    fn json(&mut self, v: &serde_json::Value) {
        // serde_json's map keeps keys sorted, so equal values write equal text.
        self.str(&v.to_string());
    }
}

/// What scopes a key besides the request itself.
pub struct Scope<'a> {
    /// The tenant namespace.
    pub namespace: &'a std::sync::Arc<str>,
    /// The policy's version (0 for a concrete model): a changed policy misses.
    pub version: u64,
    /// Request tags that change the answer (the tags a policy's variants match on).
    pub tags: &'a [(&'a str, Option<&'a str>)],
}

/// The key of `req` within `scope`.
pub fn key(scope: &Scope<'_>, req: &ChatRequest) -> CacheKey {
    let mut c = Canon(Context::new(&SHA256));
    c.str("llm-gateway cache v1");
    c.str(scope.namespace);
    c.str(&req.model);
    c.u64(scope.version);
    c.u64(scope.tags.len() as u64);
    for (name, value) in scope.tags {
        c.str(name);
        c.opt_str(*value);
    }
    c.u64(req.messages.len() as u64);
    for m in &req.messages {
        c.tag(match m.role {
            Role::System => 1,
            Role::Developer => 2,
            Role::User => 3,
            Role::Assistant => 4,
            Role::Tool => 5,
        });
        c.opt_str(m.name.as_deref());
        c.u64(m.content.len() as u64);
        for part in &m.content {
            match part {
                ContentPart::Text(t) => {
                    c.tag(1);
                    c.str(t);
                }
                ContentPart::Image(i) => {
                    c.tag(2);
                    match &i.source {
                        ImageSource::Url(u) => {
                            c.tag(1);
                            c.str(u);
                        }
                        ImageSource::Data(d) => {
                            c.tag(2);
                            c.bytes(d);
                        }
                    }
                    c.opt_str(i.mime_type.as_deref());
                    c.tag(match i.detail {
                        ImageDetail::Default => 0,
                        ImageDetail::Auto => 1,
                        ImageDetail::Low => 2,
                        ImageDetail::High => 3,
                    });
                }
                ContentPart::ToolCall(t) => {
                    c.tag(3);
                    c.str(&t.id);
                    c.str(&t.name);
                    c.str(&t.arguments);
                }
                ContentPart::ToolResult(r) => {
                    c.tag(4);
                    c.str(&r.tool_call_id);
                    c.opt_str(r.name.as_deref());
                    c.str(&r.content);
                    c.tag(u8::from(r.is_error));
                }
            }
        }
    }
    params(&mut c, &req.params);
    c.u64(req.tools.len() as u64);
    for t in &req.tools {
        c.str(&t.name);
        c.opt_str(t.description.as_deref());
        c.json(&t.parameters);
        c.tag(u8::from(t.strict));
    }
    match &req.tool_choice {
        None => c.tag(0),
        Some(ToolChoice::Auto) => c.tag(1),
        Some(ToolChoice::None) => c.tag(2),
        Some(ToolChoice::Required) => c.tag(3),
        Some(ToolChoice::Named(n)) => {
            c.tag(4);
            c.str(n);
        }
    }
    match &req.response_format {
        None => c.tag(0),
        Some(ResponseFormat::Text) => c.tag(1),
        Some(ResponseFormat::JsonObject) => c.tag(2),
        Some(ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        }) => {
            c.tag(3);
            c.str(name);
            c.json(schema);
            c.tag(u8::from(*strict));
        }
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(c.0.finish().as_ref());
    CacheKey {
        namespace: scope.namespace.clone(),
        digest,
    }
}

fn params(c: &mut Canon, p: &SamplingParams) {
    c.opt_f64(p.temperature);
    c.opt_f64(p.top_p);
    c.opt_u64(p.max_tokens.map(u64::from));
    c.u64(p.stop.len() as u64);
    for s in &p.stop {
        c.str(s);
    }
    c.opt_u64(p.seed.map(|s| s as u64));
    c.opt_f64(p.presence_penalty);
    c.opt_f64(p.frequency_penalty);
    match p.parallel_tool_calls {
        None => c.tag(0),
        Some(b) => c.tag(1 + u8::from(b)),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::types::{Message, Tool};

    fn req() -> ChatRequest {
        ChatRequest {
            model: "chat".into(),
            messages: vec![Message::text(Role::User, "hello")],
            ..ChatRequest::default()
        }
    }

    fn k(ns: &str, version: u64, r: &ChatRequest) -> CacheKey {
        let ns: Arc<str> = ns.into();
        key(
            &Scope {
                namespace: &ns,
                version,
                tags: &[],
            },
            r,
        )
    }

    #[test]
    fn equal_requests_have_equal_keys_and_attribution_does_not_matter() {
        let a = req();
        let mut b = req();
        b.tags = BTreeMap::from([("team".into(), "x".into())]);
        b.user = Some("u1".into());
        assert_eq!(k("t", 1, &a), k("t", 1, &b));
    }

    #[test]
    fn every_difference_that_changes_the_answer_changes_the_key() {
        let base = k("t", 1, &req());
        assert_ne!(base, k("u", 1, &req()), "namespace");
        assert_ne!(base, k("t", 2, &req()), "policy version");
        let variants: Vec<fn(&mut ChatRequest)> = vec![
            |r| r.model = "other".into(),
            |r| r.messages[0] = Message::text(Role::User, "hello!"),
            |r| r.messages[0].role = Role::System,
            |r| r.params.temperature = Some(0.5),
            |r| r.params.max_tokens = Some(10),
            |r| r.params.stop = vec!["x".into()],
            |r| r.params.seed = Some(1),
            |r| r.tool_choice = Some(ToolChoice::Required),
            |r| r.response_format = Some(ResponseFormat::JsonObject),
            |r| {
                r.tools = vec![Tool {
                    name: "f".into(),
                    description: None,
                    parameters: serde_json::json!({"type": "object"}),
                    strict: false,
                }]
            },
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut r = req();
            change(&mut r);
            assert_ne!(base, k("t", 1, &r), "change {i}");
        }
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        let mut a = req();
        a.messages = vec![
            Message::text(Role::User, "ab"),
            Message::text(Role::User, "c"),
        ];
        let mut b = req();
        b.messages = vec![
            Message::text(Role::User, "a"),
            Message::text(Role::User, "bc"),
        ];
        assert_ne!(k("t", 1, &a), k("t", 1, &b));
        assert_eq!(k("t", 1, &a).hex().len(), 64);
    }
}
