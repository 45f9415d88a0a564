//! The budget of a call: the caller's `grpc-timeout`, capped by the gateway's maximum; the
//! configured default when the caller set none.
//!
//! The gateway ends a call before the caller's own timer fires, so that the caller gets the
//! gateway's DEADLINE_EXCEEDED with the attempt trail rather than a bare local timeout. Two
//! things stand between the two clocks:
//! - gRPC-core clients (Python grpcio, Ruby, C++, C#, PHP) round the `grpc-timeout` they send
//!   up to a coarse grid: exact milliseconds below 1 s, then 10 ms up to 10 s, 100 ms up to
//!   100 s, 1 s beyond, each at most 1% of the value, plus about a millisecond from their
//!   clock conversion. So the header may say up to 1% + 2 ms more than the caller's real
//!   deadline ([`GRPC_CORE_ALLOWANCE_RATIO`], [`GRPC_CORE_ALLOWANCE`]). Go, Java and Rust
//!   clients send the exact remaining time; the allowance is taken off for every caller (the
//!   header does not reliably say which library sent it), which costs those 1% of their
//!   budget.
//! - The answer's way back and the caller's own scheduling: `server.deadline_margin`
//!   (default 5 ms), also taken off.

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

/// The share of a `grpc-timeout` a gRPC-core client may have added by rounding up.
pub const GRPC_CORE_ALLOWANCE_RATIO: f64 = 0.01;
/// What a gRPC-core client may have added on top of the rounding (clock conversion).
pub const GRPC_CORE_ALLOWANCE: Duration = Duration::from_millis(2);

/// The budget for a call whose caller sent `timeout`: what remains of the caller's real
/// deadline (see the module docs), less `margin`.
pub fn budget(timeout: Duration, margin: Duration) -> Duration {
    let rounding = timeout.mul_f64(GRPC_CORE_ALLOWANCE_RATIO);
    timeout
        .saturating_sub(rounding)
        .saturating_sub(GRPC_CORE_ALLOWANCE)
        .saturating_sub(margin)
}

/// Call budget settings.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Budget when the caller set no deadline.
    pub default_timeout: Duration,
    /// The longest budget, whatever the caller asks.
    pub max: Duration,
    /// The gateway ends a call this much before the caller's deadline (after the allowance
    /// for gRPC-core's rounding), so that its own status (with the attempt trail) reaches the
    /// caller before the caller gives up locally.
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
        Some(t) => budget(t, limits.margin).min(limits.max),
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

    /// What grpc-core sends for a deadline (its `Timeout::FromMillis` grid, rounded up, after
    /// its clock conversion added up to a millisecond).
    fn grpc_core_header(deadline: Duration) -> Duration {
        let ms = deadline.as_millis() as u64 + 1;
        let step = match ms {
            0..1_000 => 1,
            1_000..10_000 => 10,
            10_000..100_000 => 100,
            _ => 1_000,
        };
        Duration::from_millis(ms.div_ceil(step) * step)
    }

    #[test]
    fn the_budget_ends_before_every_clients_deadline() {
        let margin = Duration::from_millis(5);
        for ms in (100..=30_000)
            .step_by(7)
            .chain([1_000, 2_000, 10_000, 30_000])
        {
            let deadline = Duration::from_millis(ms);
            // Go, Java, Rust: the exact remaining time (a little less, after transit).
            let exact = budget(deadline, margin);
            assert!(exact + margin <= deadline, "{ms} ms");
            // gRPC core: the rounded-up header.
            let core = budget(grpc_core_header(deadline), margin);
            assert!(core + margin <= deadline, "{ms} ms: {core:?}");
            // And not much earlier than needed: at most 1% + 2 ms + the margin, and the grid.
            let slack = deadline.mul_f64(0.021) + Duration::from_millis(8);
            assert!(deadline - core <= slack, "{ms} ms: {core:?}");
        }
    }
}
