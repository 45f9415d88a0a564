//! The budget of a call: the caller's `grpc-timeout`, capped by the gateway's maximum; the
//! configured default when the caller set none.

use std::time::Duration;

use tokio::time::Instant;

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Call budget settings.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Budget when the caller set no deadline.
    pub default_timeout: Duration,
    /// The longest budget, whatever the caller asks.
    pub max: Duration,
    /// The gateway ends a call this much before the caller's deadline, so that its own status
    /// (with the attempt trail) reaches the caller before the caller gives up locally.
    pub margin: Duration,
}

/// The deadline of a call that arrived now.
pub fn call_deadline(metadata: &tonic::metadata::MetadataMap, limits: &CallLimits) -> Instant {
    let requested = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    deadline_within(requested, limits)
}

/// The deadline of a call that arrived now with the caller's timeout `requested` (from any
/// surface's header).
pub fn deadline_within(requested: Option<Duration>, limits: &CallLimits) -> Instant {
    let now = Instant::now();
    let budget = match requested {
        Some(t) => t.saturating_sub(limits.margin).min(limits.max),
        None => limits.default_timeout.min(limits.max),
    };
    now + budget
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
