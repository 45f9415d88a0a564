//! Experiments without risk: shadow traffic and A/B experiments.
//!
//! - [`assign`]: the deterministic arm assignment (a stable hash of the experiment name and
//!   the caller's sticky key), the same on every replica and after restarts.
//! - [`compare`]: the cheap comparison of a shadow reply with its primary's (length ratio,
//!   exact match, JSON agreement) written to the ledger with the shadow's record.
//! - [`report`]: GetExperiment's per-arm statistics and their confidence intervals, from
//!   aggregates the store computes in SQL ([`report::arm_sql`]).
//! - [`shadow`]: the shadow pool: mirrors sampled calls to candidate targets on a bounded
//!   pool with its own budget, never on the caller's time, limits or budget.
//!
//! The policy side (the `shadow` and `experiment` blocks, their validation, and how an arm
//! changes a call) lives in [`crate::routing::experiment`].

pub mod assign;
pub mod compare;
pub mod report;
pub mod shadow;
