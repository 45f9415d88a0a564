//! Streaming-safe reply scanning.
//!
//! A reply streams in pieces, and an entity may be split across them (`jane@exa` + `mple.com`).
//! [`StreamScanner`] holds back only the tail that may still grow into a match, and lets
//! everything before it go at once: every built-in pattern is made of one character class
//! ([`super::detect::Classes`]), so the tail to hold is the trailing run of each class (for a
//! reply of prose, the last word); for configured patterns and deny-list terms, the tail
//! from which their anchored lazy DFA is still alive (within their longest match of the
//! end). A match found before the cut is final (no later text can change it), so it is
//! rewritten and sent; the rest waits for the next piece or the finish (never a timer).
//! A PEM private-key header whose END line has not come yet swallows what follows up to it.
//! Placeholders of tokenized values are restored the same way (a `[` may begin one).
//! What is held never exceeds [`MAX_HOLD`] bytes.

use std::sync::Arc;

use super::{
    Direction, Guarding, MAX_TOKEN_LEN, Profile,
    detect::{Classes, pem_end},
};
use crate::error::GatewayError;

/// The most a scanner holds back; past it the held text is scanned and sent as is.
pub const MAX_HOLD: usize = 64 * 1024;

/// Bytes of sent text kept in front of the held text, for word boundaries.
const CONTEXT: usize = 4;

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'.' | b'_' | b'%' | b'+' | b'@' | b'=' | b'/' | b':' | b'-'
        )
}

fn is_digitish(b: u8) -> bool {
    b.is_ascii_digit() || matches!(b, b' ' | b'(' | b')' | b'+' | b'.' | b'-')
}

fn is_upperish(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b' ' | b'-')
}

fn floor_boundary(s: &str, mut at: usize) -> usize {
    while at > 0 && !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// One profile's part of a stream.
#[derive(Debug)]
struct Stage {
    profile: Arc<Profile>,
    /// `buf[..ctx]` was sent already (context); `buf[ctx..]` is held.
    buf: String,
    ctx: usize,
    /// Inside a PEM block being removed: wait for its END line.
    in_pem: bool,
    /// The lazy DFA cache of the configured patterns' hold (made on first use).
    extra: Option<regex_automata::hybrid::dfa::Cache>,
}

impl Stage {
    /// Where the held tail begins (in `buf`).
    fn cut(&mut self, c: Classes) -> usize {
        let b = self.buf.as_bytes();
        let len = b.len();
        let run = |pred: fn(u8) -> bool| {
            let mut i = len;
            while i > self.ctx && pred(b[i - 1]) {
                i -= 1;
            }
            i
        };
        let mut cut = len;
        if c.token {
            cut = cut.min(run(is_token));
        }
        if c.digits {
            let mut s = run(is_digitish);
            while s < len && matches!(b[s], b' ' | b'.' | b'-' | b')') {
                s += 1;
            }
            cut = cut.min(s);
        }
        if c.upper {
            let mut s = run(is_upperish);
            while s < len && b[s] == b' ' {
                s += 1;
            }
            cut = cut.min(s);
        }
        if c.fixed > 0 {
            let hold = self
                .profile
                .detector()
                .extra_hold(&self.buf, self.ctx, &mut self.extra);
            cut = cut.min(hold);
        }
        if len - cut > MAX_HOLD {
            cut = len;
        }
        floor_boundary(&self.buf, cut).max(self.ctx)
    }

    fn push(&mut self, chunk: &str, flush: bool, g: &mut Guarding) -> String {
        self.buf.push_str(chunk);
        if self.in_pem {
            match pem_end(&self.buf, 0) {
                Some(end) => {
                    self.in_pem = false;
                    self.buf.drain(..end);
                    self.ctx = 0;
                }
                None => {
                    // Keep enough to see an END line split across pieces.
                    let keep = floor_boundary(&self.buf, self.buf.len().saturating_sub(64));
                    self.buf.drain(..keep);
                    if flush {
                        self.buf.clear();
                    }
                    return String::new();
                }
            }
        }
        let len = self.buf.len();
        let mut cut = if flush {
            len
        } else {
            self.cut(self.profile.detector().classes)
        };
        let findings = self.profile.detector().find(&self.buf, self.ctx);
        let mut used = Vec::new();
        let mut open_pem = false;
        for f in findings {
            if f.range.start >= cut {
                break;
            }
            if f.range.end > cut {
                cut = f.range.end;
            }
            if !flush
                && f.range.end == len
                && self.buf[f.range.start..].starts_with("-----BEGIN")
                && self
                    .profile
                    .action(f.entity, Direction::Reply)
                    .is_some_and(|e| e.action != super::Action::Log)
            {
                open_pem = true;
            }
            used.push(f);
        }
        let out = self.profile.render(
            &self.buf,
            self.ctx..cut,
            &used,
            Direction::Reply,
            &mut g.state,
        );
        if open_pem {
            self.in_pem = true;
            let keep = floor_boundary(&self.buf, len.saturating_sub(64));
            self.buf.drain(..keep);
            self.ctx = 0;
        } else {
            let keep = floor_boundary(&self.buf, cut.saturating_sub(CONTEXT));
            self.buf.drain(..keep);
            self.ctx = cut - keep;
        }
        out
    }
}

/// The held `[`...: where a placeholder may begin, in `text`.
fn token_start(text: &str) -> Option<usize> {
    let open = text.rfind('[')?;
    let rest = &text[open + 1..];
    (rest.len() < MAX_TOKEN_LEN
        && rest
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'))
    .then_some(open)
}

/// Scans one stream of reply text (the text, the reasoning, or one tool call's arguments).
#[derive(Debug)]
pub struct StreamScanner {
    stages: Vec<Stage>,
    /// Text held for placeholder restoration.
    held: String,
    escape: fn(&str, &mut String),
}

impl StreamScanner {
    /// A scanner for the call's reply-scanning profiles (applied in reply order: the
    /// policy's, then the key's); `escape` writes a restored value.
    pub fn new(g: &Guarding, escape: fn(&str, &mut String)) -> Self {
        Self {
            stages: g
                .profiles
                .iter()
                .rev()
                .filter(|p| p.scans_replies())
                .map(|p| Stage {
                    profile: p.clone(),
                    buf: String::new(),
                    ctx: 0,
                    in_pem: false,
                    extra: None,
                })
                .collect(),
            held: String::new(),
            escape,
        }
    }

    /// The text that may be sent after `chunk`; an error when a blocked type appeared.
    pub fn push(&mut self, chunk: &str, g: &mut Guarding) -> Result<String, GatewayError> {
        self.run(chunk, false, g)
    }

    /// Everything still held, at the end of the stream.
    pub fn finish(&mut self, g: &mut Guarding) -> Result<String, GatewayError> {
        self.run("", true, g)
    }

    /// Whether text is held.
    pub fn holds(&self) -> bool {
        !self.held.is_empty() || self.stages.iter().any(|s| s.buf.len() > s.ctx)
    }

    fn run(&mut self, chunk: &str, flush: bool, g: &mut Guarding) -> Result<String, GatewayError> {
        let mut text = chunk.to_owned();
        for stage in &mut self.stages {
            text = stage.push(&text, flush, g);
        }
        if let Some(err) = g.state.take_blocked(&g.profiles, Direction::Reply) {
            return Err(err);
        }
        if g.state.vault.is_empty() {
            return Ok(text);
        }
        self.held.push_str(&text);
        let at = if flush {
            self.held.len()
        } else {
            token_start(&self.held).unwrap_or(self.held.len())
        };
        let rest = self.held.split_off(at);
        let ready = std::mem::replace(&mut self.held, rest);
        Ok(g.state.vault.restore(&ready, self.escape).unwrap_or(ready))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::{RawProfile, plain};

    fn guarding(toml_text: &str) -> Guarding {
        let raw: RawProfile = toml::from_str(toml_text).unwrap();
        let mut issues = crate::settings::Issues::new();
        let p = Profile::from_raw("p", raw, &mut issues).unwrap();
        Guarding::new(vec![Arc::new(p)])
    }

    /// Streams `pieces` through a scanner; the sent pieces, and the whole.
    fn stream(g: &mut Guarding, pieces: &[&str]) -> Result<(Vec<String>, String), GatewayError> {
        let mut s = StreamScanner::new(g, plain);
        let mut sent = Vec::new();
        for p in pieces {
            sent.push(s.push(p, g)?);
        }
        sent.push(s.finish(g)?);
        let whole = sent.concat();
        Ok((sent, whole))
    }

    /// Every split of `text` into two and three pieces gives the unary result.
    fn every_split(toml_text: &str, text: &str) {
        let mut unary = guarding(toml_text);
        let expected = unary.profiles[0]
            .rewrite(text, Direction::Reply, &mut unary.state)
            .into_owned();
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|i| text.is_char_boundary(*i))
            .collect();
        for &i in &cuts {
            let mut g = guarding(toml_text);
            let (_, whole) = stream(&mut g, &[&text[..i], &text[i..]]).unwrap();
            assert_eq!(whole, expected, "split at {i} of {text:?}");
            for &j in cuts.iter().filter(|j| **j > i).step_by(3) {
                let mut g = guarding(toml_text);
                let (_, whole) = stream(&mut g, &[&text[..i], &text[i..j], &text[j..]]).unwrap();
                assert_eq!(whole, expected, "split at {i}, {j} of {text:?}");
            }
        }
    }

    #[test]
    fn a_split_entity_never_slips_through() {
        let all = r#"default_action = "redact""#;
        every_split(all, "Mail jane.doe@example.com or call +44 20 7946 0958.");
        every_split(
            all,
            "Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00 ok",
        );
        every_split(
            all,
            "ssn 536-22-1234; host 2001:db8::8a2e:370:7334 and 10.0.0.1",
        );
        every_split(
            all,
            "key sk-proj-AbC123dEf456GhI789jKl012 and AKIAIOSFODNN7EXAMPLE.",
        );
        every_split(
            all,
            "x -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY----- after",
        );
        every_split(
            "deny = [\"project titan\"]\ndeny_action = \"redact\"",
            "about Project Titan today",
        );
    }

    #[test]
    fn prose_goes_out_at_once_but_the_last_word() {
        let mut g = guarding(r#"default_action = "redact""#);
        let mut s = StreamScanner::new(&g, plain);
        assert_eq!(
            s.push("Hello there, how are", &mut g).unwrap(),
            "Hello there, how "
        );
        assert_eq!(s.push(" you? Fine", &mut g).unwrap(), "are you? ");
        assert_eq!(s.finish(&mut g).unwrap(), "Fine");
    }

    const CONFIGURED: &str = r#"
deny = ["project titan"]
deny_action = "redact"
patterns = [{ name = "employee_id", regex = "EMP-[0-9]{6}", action = "redact" }]
"#;

    #[test]
    fn a_configured_pattern_never_slips_through() {
        every_split(
            CONFIGURED,
            "id EMP-123456, not EMP-12345 nor EMP-1234567; project titan, project titanic.",
        );
    }

    /// The hold for configured patterns and deny terms is only the tail that may still
    /// grow into their match, not their longest match whatever the text.
    #[test]
    fn only_a_tail_that_may_start_a_configured_match_is_held() {
        let mut g = guarding(CONFIGURED);
        let mut s = StreamScanner::new(&g, plain);
        // Nothing here can begin `EMP-` or `project titan`: it all goes at once.
        assert_eq!(
            s.push("see you at the meeting", &mut g).unwrap(),
            "see you at the meeting"
        );
        assert!(!s.holds());
        assert_eq!(s.push(" about proj", &mut g).unwrap(), " about ");
        assert_eq!(s.push("ect tit", &mut g).unwrap(), "");
        // `titanic` is not the term: released as soon as that is clear.
        assert_eq!(
            s.push("anic and E", &mut g).unwrap(),
            "project titanic and "
        );
        assert_eq!(s.push("MP-12", &mut g).unwrap(), "");
        assert_eq!(s.push("3456 ok", &mut g).unwrap(), "[EMPLOYEE_ID] ok");
        assert!(!s.holds());
        assert_eq!(s.push("; project titan", &mut g).unwrap(), "; ");
        // The term is complete but a word character may still follow it.
        assert!(s.holds());
        assert_eq!(s.finish(&mut g).unwrap(), "[DENY_LIST]");
    }

    #[test]
    fn a_pem_block_is_swallowed_until_its_end() {
        let mut g = guarding(r#"actions = { secret = "redact" }"#);
        let (sent, whole) = stream(
            &mut g,
            &[
                "before -----BEGIN RSA PRIVATE KEY-----\nMIIE",
                "owIBAAKCAQEA\n",
                "abc\n-----END RSA PRI",
                "VATE KEY----- after",
            ],
        )
        .unwrap();
        assert_eq!(whole, "before [SECRET] after");
        assert_eq!(sent[1], "");
    }

    #[test]
    fn blocked_types_end_the_stream() {
        let mut g = guarding(r#"actions = { credit_card = "block" }"#);
        let err = stream(&mut g, &["pay with 4111 1111 ", "1111 1111 thanks"]).unwrap_err();
        assert_eq!(err.reason(), "GUARDRAIL_BLOCKED");
        assert!(err.to_string().contains("credit_card"));
    }

    #[test]
    fn tokens_are_restored_across_pieces() {
        let mut g = guarding(r#"actions = { email = "tokenize" }"#);
        let mut req = crate::types::ChatRequest {
            messages: vec![crate::types::Message::text(
                crate::types::Role::User,
                "to jo@example.com",
            )],
            ..Default::default()
        };
        g.request(&mut req).unwrap();
        let (_, whole) = stream(&mut g, &["Sent to [EMA", "IL_1", "] ok [not a token"]).unwrap();
        assert_eq!(whole, "Sent to jo@example.com ok [not a token");
    }
}
