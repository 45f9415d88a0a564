//! The cheap comparison of a shadow reply with its primary's: length ratio, exact match,
//! and in JSON mode whether both parse and agree (as JSON values, so key order and spacing
//! do not matter).

use crate::{
    ledger::Comparison,
    types::{ChatResponse, ContentPart, FinishReason},
};

/// The text a reply is compared by: its text parts, then each tool call as
/// `name(arguments)`.
pub fn reply_text(response: &ChatResponse) -> String {
    let mut out = String::new();
    for part in &response.content {
        match part {
            ContentPart::Text(t) => out.push_str(t),
            ContentPart::ToolCall(c) => {
                out.push_str(&c.name);
                out.push('(');
                out.push_str(&c.arguments);
                out.push(')');
            }
            ContentPart::Image(_) | ContentPart::ToolResult(_) => {}
        }
    }
    out
}

/// The ledger name of a finish reason.
pub fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Unspecified => "",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other => "other",
    }
}

/// Compares a shadow's reply text with the primary's; `json` when the call asked for a
/// JSON reply.
pub fn compare(primary: &str, shadow: &str, json: bool, finish: FinishReason) -> Comparison {
    let (p, s) = (primary.chars().count(), shadow.chars().count());
    let length_ratio = match (p, s) {
        (0, 0) => Some(1.0),
        (0, _) => None,
        (p, s) => Some(s as f64 / p as f64),
    };
    let json_agree = json.then(|| {
        let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).ok();
        match (parse(primary), parse(shadow)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    });
    Comparison {
        length_ratio,
        exact_match: primary == shadow,
        json_agree,
        finish_reason: finish_label(finish).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons() {
        let c = compare("abcd", "ab", false, FinishReason::Stop);
        assert_eq!(c.length_ratio, Some(0.5));
        assert!(!c.exact_match);
        assert_eq!(c.json_agree, None);
        assert_eq!(c.finish_reason, "stop");
        let same = compare("héllo", "héllo", false, FinishReason::Length);
        assert_eq!(same.length_ratio, Some(1.0));
        assert!(same.exact_match);
        let json = compare(
            r#"{"a":1,"b":[2]}"#,
            r#"{ "b": [2], "a": 1 }"#,
            true,
            FinishReason::Stop,
        );
        assert_eq!(json.json_agree, Some(true));
        assert!(!json.exact_match);
        let differ = compare(r#"{"a":1}"#, r#"{"a":2}"#, true, FinishReason::Stop);
        assert_eq!(differ.json_agree, Some(false));
        let broken = compare(r#"{"a":1}"#, "not json", true, FinishReason::Stop);
        assert_eq!(broken.json_agree, Some(false));
        assert_eq!(
            compare("", "x", false, FinishReason::Stop).length_ratio,
            None
        );
        assert_eq!(
            compare("", "", false, FinishReason::Stop).length_ratio,
            Some(1.0)
        );
    }
}
