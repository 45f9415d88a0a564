//! Who may call: gateway API keys, the break-glass admin token, and the limits and budgets
//! that apply to a caller. Shared by the data-plane and admin handlers.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::authz::{Principal, Requirement};
use crate::{
    auth::KeyRecord,
    auth::{Caller, KeyRing, Scope, bearer_header, constant_time_eq},
    error::GatewayError,
    limits::{Limits, SubjectLimits, Subjects, TeamLimits},
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
    /// Each key's subjects, built on first use and again when its record changes.
    subjects: RwLock<HashMap<String, (Arc<KeyRecord>, Subjects)>>,
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
            subjects: RwLock::default(),
        }
    }

    /// Checks a call's credential (`authorization: Bearer ...` in `headers`) against what its
    /// RPC requires; the one credential check of the server (see [`super::authz`]).
    pub fn authorize(
        &self,
        requires: Requirement,
        headers: &http::HeaderMap,
    ) -> Result<Principal, GatewayError> {
        match requires {
            Requirement::None => Ok(Principal::Anonymous),
            Requirement::Chat => Ok(self
                .chat_caller_secret(bearer_header(headers))?
                .map_or(Principal::Anonymous, Principal::Key)),
            Requirement::UsageRead => self.admin_secret(bearer_header(headers), Scope::UsageRead),
            Requirement::Admin => self.admin_secret(bearer_header(headers), Scope::Admin),
        }
    }

    /// The caller of a data-plane call: a verified `chat` key, or `None` when no key was sent
    /// and none is required.
    pub fn chat_caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<Caller>, GatewayError> {
        self.chat_caller_secret(bearer_header(metadata.as_ref()))
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

    /// An admin credential: the break-glass token, or a key with `scope` (`admin` keys may
    /// also read usage).
    fn admin_secret(&self, secret: Option<&str>, scope: Scope) -> Result<Principal, GatewayError> {
        let secret = secret.ok_or_else(|| {
            GatewayError::Unauthenticated(
                "admin calls need `authorization: Bearer <admin token or admin key>` metadata"
                    .to_owned(),
            )
        })?;
        if constant_time_eq(secret.as_bytes(), self.break_glass.as_bytes()) {
            return Ok(Principal::AdminToken);
        }
        let caller = self.keys.verify(secret, now_ms()).map_err(|_| {
            GatewayError::Unauthenticated("the admin credential is not valid".to_owned())
        })?;
        if !(scope == Scope::UsageRead && caller.require(Scope::Admin).is_ok()) {
            caller.require(scope)?;
        }
        Ok(Principal::Key(caller))
    }

    /// The limits that apply to a caller: its key's, and its team's (built once per key
    /// record, so a call formats no names).
    pub fn subjects(&self, caller: &Caller) -> Subjects {
        let name = &caller.key.spec.name;
        if let Some((record, subjects)) = self
            .subjects
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            && Arc::ptr_eq(record, &caller.key)
        {
            return subjects.clone();
        }
        let subjects = self.limits.subjects(self.subject_limits(caller));
        self.subjects
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), (caller.key.clone(), subjects.clone()));
        subjects
    }

    fn subject_limits(&self, caller: &Caller) -> Vec<SubjectLimits> {
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
