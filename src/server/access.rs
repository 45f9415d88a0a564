//! Who may call: gateway API keys, the break-glass admin token, and the limits and budgets
//! that apply to a caller. Shared by the data-plane and admin handlers.

use std::{collections::HashMap, sync::Arc};

use crate::{
    auth::{Caller, KeyRing, Scope, bearer, constant_time_eq},
    error::GatewayError,
    limits::{Limits, SubjectLimits, TeamLimits},
};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Access control state.
pub struct Access {
    /// The key cache.
    pub keys: Arc<KeyRing>,
    /// Limits and budgets.
    pub limits: Arc<Limits>,
    /// The break-glass admin token.
    break_glass: String,
    /// Whether data-plane calls need a key.
    pub require_keys: bool,
    /// Team limits by team name.
    teams: HashMap<String, TeamLimits>,
}

impl Access {
    /// Access control with these settings.
    pub fn new(
        keys: Arc<KeyRing>,
        limits: Arc<Limits>,
        break_glass: String,
        require_keys: bool,
        teams: HashMap<String, TeamLimits>,
    ) -> Self {
        Self {
            keys,
            limits,
            break_glass,
            require_keys,
            teams,
        }
    }

    /// The caller of a data-plane call: a verified `chat` key, or `None` when no key was sent
    /// and none is required.
    pub fn chat_caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<Caller>, GatewayError> {
        self.chat_caller_secret(bearer(metadata))
    }

    /// Like [`Access::chat_caller`], for a secret any surface extracted from its request.
    pub fn chat_caller_secret(&self, secret: Option<&str>) -> Result<Option<Caller>, GatewayError> {
        match secret {
            Some(secret) => {
                let caller = self.keys.verify(secret, now_ms())?;
                caller.require(Scope::Chat)?;
                Ok(Some(caller))
            }
            None if self.require_keys => Err(GatewayError::Unauthenticated(
                "this gateway requires an api key: send `authorization: Bearer <key>`".to_owned(),
            )),
            None => Ok(None),
        }
    }

    /// Checks an admin call: the break-glass token, or a key with `scope` (`admin` keys may
    /// also read usage).
    pub fn admin(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        scope: Scope,
    ) -> Result<(), GatewayError> {
        let secret = bearer(metadata).ok_or_else(|| {
            GatewayError::Unauthenticated(
                "admin calls need `authorization: Bearer <admin token or admin key>` metadata"
                    .to_owned(),
            )
        })?;
        if constant_time_eq(secret.as_bytes(), self.break_glass.as_bytes()) {
            return Ok(());
        }
        let caller = self.keys.verify(secret, now_ms()).map_err(|_| {
            GatewayError::Unauthenticated("the admin credential is not valid".to_owned())
        })?;
        if scope == Scope::UsageRead && caller.require(Scope::Admin).is_ok() {
            return Ok(());
        }
        caller.require(scope)
    }

    /// The limits that apply to a caller: its key's, and its team's.
    pub fn subjects(&self, caller: &Caller) -> Vec<SubjectLimits> {
        let spec = &caller.key.spec;
        let mut out = vec![SubjectLimits {
            subject: format!("key:{}", spec.name),
            requests_per_minute: spec.requests_per_minute,
            tokens_per_minute: spec.tokens_per_minute,
            max_concurrent_streams: spec.max_concurrent_streams,
            daily_budget_usd: spec.daily_budget_usd,
            monthly_budget_usd: spec.monthly_budget_usd,
        }];
        if let Some(team) = self.teams.get(&spec.owner) {
            out.push(SubjectLimits {
                subject: format!("team:{}", spec.owner),
                requests_per_minute: team.requests_per_minute,
                tokens_per_minute: team.tokens_per_minute,
                max_concurrent_streams: 0,
                daily_budget_usd: team.daily_budget_usd,
                monthly_budget_usd: team.monthly_budget_usd,
            });
        }
        out
    }
}
