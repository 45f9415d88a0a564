//! The `llmgateway.v1.LlmGatewayAdmin` handlers: policy CRUD with etags, validation, route
//! explanations and provider health; and the admin credential check.
//!
//! Writes are serialized: store the change, rebuild the routing table from the config
//! policies and the stored ones, swap it in. New calls see the change at once; calls in
//! flight keep their plan.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::{Mutex, mpsc};
use tonic::{Request, Response, Status};

use super::{access::Access, authz::Principal, convert, convert_admin};
use crate::{
    audit::{self, Auditor},
    auth::{self, KeyRecord},
    error::{FieldViolation, GatewayError},
    pb::{self, llm_gateway_admin_server::LlmGatewayAdmin},
    rollout::{self, Rollouts},
    routing::{PolicyRecord, PolicySource, Router, policy},
    store::{Change, Store, StoreError},
};

/// Maximum page size of ListPolicies.
const MAX_PAGE: usize = 500;

/// Records per ExportUsage message (and per page read from the store).
const EXPORT_PAGE: usize = 500;

/// The GetUsage dimensions, for the message that refuses another.
const USAGE_DIMENSIONS: &str = "provider, model, policy, key, rpc, code, guardrail_phase, guardrail_entity, guardrail_action, tag:NAME";

/// A configured provider, as ListProviders shows it.
#[derive(Debug, Clone)]
pub struct ProviderInfo {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Base URL.
    pub base_url: String,
}

/// The admin service.
pub struct AdminService {
    access: Arc<Access>,
    router: Arc<Router>,
    store: Arc<dyn Store>,
    config_policies: BTreeMap<String, PolicyRecord>,
    providers: Vec<ProviderInfo>,
    writes: Mutex<()>,
    reloader: Option<Arc<crate::reload::Reloader>>,
    cache: Option<Arc<crate::cache::ResponseCache>>,
    auditor: Auditor,
    rollouts: Arc<Rollouts>,
}

impl AdminService {
    /// An admin service over the router and store.
    pub fn new(
        access: Arc<Access>,
        router: Arc<Router>,
        store: Arc<dyn Store>,
        config_policies: Vec<PolicyRecord>,
        providers: Vec<ProviderInfo>,
    ) -> Self {
        Self {
            access,
            router,
            auditor: Auditor::new(store.clone()),
            rollouts: Arc::new(
                Rollouts::new(store.clone()).with_auditor(Auditor::new(store.clone())),
            ),
            store,
            config_policies: config_policies
                .into_iter()
                .map(|r| (r.spec.name.clone(), r))
                .collect(),
            providers,
            writes: Mutex::new(()),
            reloader: None,
            cache: None,
        }
    }

    /// The audit log: every change made through this service is recorded here, and other
    /// control-plane components (rollouts) record theirs through it too.
    pub fn auditor(&self) -> &Auditor {
        &self.auditor
    }

    /// Records a change (a failed write is logged by the auditor; the change stands).
    async fn audit(&self, entry: audit::Entry) {
        let _ = self.auditor.record(entry).await;
    }

    /// The staged rollouts this service stages and the snapshot follows.
    pub fn rollouts(&self) -> &Arc<Rollouts> {
        &self.rollouts
    }

    /// Serves `InvalidateCache` on `cache`.
    pub fn with_cache(mut self, cache: Arc<crate::cache::ResponseCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Serves `ReloadConfig` with `reloader`.
    pub fn with_reloader(mut self, reloader: Arc<crate::reload::Reloader>) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// Rebuilds the routing table from the config policies and the store, and swaps it in.
    pub async fn reload(&self) -> Result<(), GatewayError> {
        let stored = self.store.list_policies().await.map_err(store_error)?;
        let mut all: BTreeMap<String, PolicyRecord> = BTreeMap::new();
        for record in stored {
            if self.config_policies.contains_key(&record.spec.name) {
                tracing::warn!(
                    policy = %record.spec.name,
                    "a stored policy has the name of a config policy; the config one wins"
                );
                continue;
            }
            all.insert(record.spec.name.clone(), record);
        }
        for (name, record) in &self.config_policies {
            all.insert(name.clone(), record.clone());
        }
        let splits = self.rollouts.sync(&all).await.map_err(store_error)?;
        let table = self
            .router
            .load()
            .with_policies(all.into_values())
            .with_rollouts(splits);
        self.router.store(table);
        Ok(())
    }

    fn check(
        &self,
        spec: &policy::PolicySpec,
        mut violations: Vec<FieldViolation>,
    ) -> Result<(), GatewayError> {
        let table = self.router.load();
        violations.extend(policy::validate(spec, &*table, "policy"));
        let size = serde_json::to_vec(spec).map_or(usize::MAX, |d| d.len());
        if size > policy::MAX_DOCUMENT_BYTES {
            violations.push(FieldViolation::new(
                "policy",
                format!(
                    "the policy document is {size} bytes; at most {} are allowed",
                    policy::MAX_DOCUMENT_BYTES
                ),
            ));
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(GatewayError::InvalidArgument(violations))
        }
    }

    /// Reloads the key cache from the store.
    pub async fn reload_keys(&self) -> Result<(), GatewayError> {
        let keys = self.store.list_keys().await.map_err(store_error)?;
        self.access.keys.replace(keys);
        Ok(())
    }

    /// Applies what other replicas change (see [`Store::follow_changes`]) to this one's
    /// routing table and key cache until the feed ends. A policy notification whose version
    /// the table already has is skipped (this replica's own writes); the others reload from
    /// the store, serialized with this replica's writes so an older read never replaces a
    /// newer snapshot. A failed reload keeps the last snapshot; the feed's resync after it
    /// reconnects (or its periodic one) catches up.
    pub async fn follow(self: Arc<Self>, mut changes: mpsc::Receiver<Change>) {
        while let Some(first) = changes.recv().await {
            let mut policies = false;
            let mut keys = false;
            let table = self.router.load();
            let mut next = Some(first);
            while let Some(change) = next {
                match change {
                    Change::Resync => {
                        policies = true;
                        keys = true;
                    }
                    Change::Policy { name, version } => {
                        let have = table
                            .policies()
                            .get(&name)
                            .filter(|r| r.source == PolicySource::Api)
                            .map(|r| r.version);
                        policies |= match (version, have) {
                            (Some(new), Some(have)) => new > have,
                            (None, None) => false,
                            _ => true,
                        };
                    }
                    Change::Key { .. } => keys = true,
                    Change::Rollout { .. } => policies = true,
                }
                next = changes.try_recv().ok();
            }
            let _write = self.writes.lock().await;
            if policies && let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "cannot apply a policy change from the store; routing stays on the last snapshot");
            }
            if keys && let Err(e) = self.reload_keys().await {
                tracing::warn!(error = %e, "cannot apply a key change from the store; the last key set stays");
            }
        }
    }

    fn key_out(&self, record: &KeyRecord) -> pb::Key {
        let (today, month) = self.access.limits.spent(
            &format!("key:{}", record.spec.name),
            super::access::now_ms(),
        );
        convert_admin::key_out(record, today, month)
    }

    /// A stored policy for the API, with its rollout's state and running spec.
    fn policy_out(&self, record: &PolicyRecord) -> pb::Policy {
        let mut out = convert_admin::policy_out(record);
        let name = &record.spec.name;
        out.rollout_state = self
            .rollouts
            .state_of(name)
            .map_or(0, convert_admin::rollout_state_out);
        out.rollout = self
            .rollouts
            .active_spec(name)
            .map(|s| convert_admin::rollout_spec_out(&s));
        out
    }

    fn read_only(&self, name: &str) -> Result<(), GatewayError> {
        if self.config_policies.contains_key(name) {
            return Err(GatewayError::FailedPrecondition {
                reason: "POLICY_READ_ONLY",
                message: format!(
                    "policy `{name}` is defined in the config file and is read-only through the api"
                ),
            });
        }
        Ok(())
    }
}

/// The caller of an admin call, for the audit log (the authorization layer put it there).
fn actor<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Principal>()
        .map_or_else(|| "unknown".to_owned(), Principal::actor)
}

/// The audit entry of an admin call on a rollout.
fn rollout_entry(actor: String, action: &str, view: &rollout::RolloutView) -> audit::Entry {
    let r = &view.record;
    audit::Entry::new(actor, action, "policy", &r.policy).with_detail(format!(
        "rollout of v{} over v{}: {} at step {} ({}%){}",
        r.canary_version,
        r.baseline_version,
        rollout::state_name(r.state),
        r.step,
        r.percent(),
        if r.reason.is_empty() {
            String::new()
        } else {
            format!("; {}", r.reason)
        }
    ))
}

/// The audit entry of a config reload made by `actor`.
pub fn reload_entry(actor: String, report: &crate::reload::ReloadReport) -> audit::Entry {
    let mut detail = format!("reloaded: {}", list_or_none(&report.reloaded));
    if !report.restart_needed.is_empty() {
        detail.push_str(&format!(
            "; restart needed: {}",
            report.restart_needed.join(", ")
        ));
    }
    audit::Entry::new(actor, "ReloadConfig", "config", "").with_detail(detail)
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_owned()
    } else {
        items.join(", ")
    }
}

/// Largest page of ListAuditLog.
const MAX_AUDIT_PAGE: usize = 500;

fn store_error(err: StoreError) -> GatewayError {
    match err {
        StoreError::AlreadyExists(name) => {
            GatewayError::AlreadyExists(format!("a policy named `{name}` already exists"))
        }
        StoreError::NotFound(name) => GatewayError::NotFound {
            reason: "POLICY_NOT_FOUND",
            message: format!("no policy named `{name}`"),
        },
        StoreError::Conflict { name, current } => GatewayError::Aborted(format!(
            "policy `{name}` was changed concurrently; its current etag is v{current}: get it and retry"
        )),
        StoreError::Key(msg) if msg.starts_with("no key") => GatewayError::NotFound {
            reason: "KEY_NOT_FOUND",
            message: msg,
        },
        StoreError::Key(msg) => GatewayError::AlreadyExists(msg),
        StoreError::Backend(msg) => {
            tracing::error!(error = %msg, "store failure");
            GatewayError::Unavailable {
                reason: "STORE_UNAVAILABLE",
                message: "the policy store failed; retry".to_owned(),
                retry_after: None,
            }
        }
    }
}

fn parse_etag(etag: &str, field: &str) -> Result<u64, GatewayError> {
    etag.strip_prefix('v')
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            GatewayError::invalid(field, format!("`{etag}` is not an etag from this gateway"))
        })
}

fn required_policy(p: Option<pb::Policy>) -> Result<pb::Policy, GatewayError> {
    p.ok_or_else(|| GatewayError::invalid("policy", "is required"))
}

fn encode_token(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

type AdminResult<T> = Result<Response<T>, Status>;

fn to_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// The `[start, end)` range in Unix ms: default the last 24 hours.
fn time_range(
    start: Option<prost_types::Timestamp>,
    end: Option<prost_types::Timestamp>,
) -> Result<(i64, i64), GatewayError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let end = end.as_ref().map_or(now, to_ms);
    let start = start.as_ref().map_or(end - 24 * 3600 * 1000, to_ms);
    if start >= end {
        return Err(GatewayError::invalid(
            "start_time",
            "must be before end_time",
        ));
    }
    Ok((start, end))
}

/// The records of a time range, as stored.
pub type ExportStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::ExportUsageResponse, Status>> + Send>,
>;

fn fail(err: GatewayError) -> Status {
    err.log("admin call failed");
    err.into_status()
}

#[tonic::async_trait]
impl LlmGatewayAdmin for AdminService {
    async fn create_policy(
        &self,
        request: Request<pb::CreatePolicyRequest>,
    ) -> AdminResult<pb::CreatePolicyResponse> {
        async {
            let actor = actor(&request);
            let p = required_policy(request.into_inner().policy)?;
            let (spec, violations) = convert_admin::policy_in(p, "policy");
            self.check(&spec, violations)?;
            let _write = self.writes.lock().await;
            if self.config_policies.contains_key(&spec.name) {
                return Err(GatewayError::AlreadyExists(format!(
                    "a policy named `{}` is defined in the config file",
                    spec.name
                )));
            }
            let record = self.store.create_policy(spec).await.map_err(store_error)?;
            self.reload().await?;
            tracing::info!(policy = %record.spec.name, etag = %record.etag(), "policy created");
            self.audit(
                audit::Entry::new(actor, "CreatePolicy", "policy", &record.spec.name)
                    .with_etags("", record.etag())
                    .with_detail(format!(
                        "created with {} targets",
                        record.spec.targets.len()
                    )),
            )
            .await;
            Ok(Response::new(pb::CreatePolicyResponse {
                policy: Some(convert_admin::policy_out(&record)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn update_policy(
        &self,
        request: Request<pb::UpdatePolicyRequest>,
    ) -> AdminResult<pb::UpdatePolicyResponse> {
        async {
            let actor = actor(&request);
            let p = required_policy(request.into_inner().policy)?;
            if p.etag.is_empty() {
                return Err(GatewayError::invalid(
                    "policy.etag",
                    "is required: send the etag of the version you are replacing",
                ));
            }
            let version = parse_etag(&p.etag, "policy.etag")?;
            let mut p = p;
            let staged = p.rollout.take();
            let (spec, mut violations) = convert_admin::policy_in(p, "policy");
            let staged = staged.map(|r| {
                let (spec, problems) = convert_admin::rollout_spec_in(r, "policy.rollout");
                violations.extend(problems);
                spec
            });
            self.read_only(&spec.name)?;
            self.check(&spec, violations)?;
            let _write = self.writes.lock().await;
            let before = self
                .store
                .get_policy(&spec.name)
                .await
                .map_err(store_error)?
                .filter(|b| b.version == version);
            rollout::refuse_during_rollout(&self.rollouts, &spec.name).await?;
            let record = match staged {
                Some(staged) => {
                    let current = self
                        .store
                        .get_policy(&spec.name)
                        .await
                        .map_err(store_error)?
                        .ok_or_else(|| store_error(StoreError::NotFound(spec.name.clone())))?;
                    if current.version != version {
                        return Err(store_error(StoreError::Conflict {
                            name: spec.name,
                            current: current.version,
                        }));
                    }
                    self.rollouts.stage(&current, spec, staged).await?
                }
                None => self
                    .store
                    .update_policy(spec, version)
                    .await
                    .map_err(store_error)?,
            };
            self.reload().await?;
            tracing::info!(policy = %record.spec.name, etag = %record.etag(), "policy updated");
            let mut detail = before.map_or_else(String::new, |b| {
                audit::changed_fields(&b.spec, &record.spec)
            });
            if let Some(spec) = self.rollouts.active_spec(&record.spec.name) {
                detail.push_str(&format!(
                    "; staged as a rollout: steps {:?}%, {:?} each",
                    spec.steps, spec.step_duration
                ));
            }
            self.audit(
                audit::Entry::new(actor, "UpdatePolicy", "policy", &record.spec.name)
                    .with_etags(format!("v{version}"), record.etag())
                    .with_detail(detail),
            )
            .await;
            Ok(Response::new(pb::UpdatePolicyResponse {
                policy: Some(self.policy_out(&record)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> AdminResult<pb::GetPolicyResponse> {
        async {
            let name = request.into_inner().name;
            if let Some(record) = self.config_policies.get(&name) {
                return Ok(Response::new(pb::GetPolicyResponse {
                    policy: Some(convert_admin::policy_out(record)),
                }));
            }
            let record = self
                .store
                .get_policy(&name)
                .await
                .map_err(store_error)?
                .ok_or_else(|| store_error(StoreError::NotFound(name)))?;
            Ok(Response::new(pb::GetPolicyResponse {
                policy: Some(self.policy_out(&record)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> AdminResult<pb::ListPoliciesResponse> {
        async {
            let req = request.into_inner();
            let size = match req.page_size {
                0 => 50,
                n => (n as usize).min(MAX_PAGE),
            };
            let after = if req.page_token.is_empty() {
                None
            } else {
                Some(decode_token(&req.page_token).ok_or_else(|| {
                    GatewayError::invalid("page_token", "is not a token from a previous page")
                })?)
            };
            // The table holds exactly what routes: config policies and stored ones.
            let table = self.router.load();
            let mut page: Vec<pb::Policy> = table
                .policies()
                .iter()
                .filter(|(name, _)| after.as_ref().is_none_or(|a| *name > a))
                .take(size + 1)
                .map(|(_, r)| convert_admin::policy_out(r))
                .collect();
            let next_page_token = if page.len() > size {
                page.truncate(size);
                page.last()
                    .map(|p| encode_token(&p.name))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok(Response::new(pb::ListPoliciesResponse {
                policies: page,
                next_page_token,
            }))
        }
        .await
        .map_err(fail)
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> AdminResult<pb::DeletePolicyResponse> {
        async {
            let actor = actor(&request);
            let req = request.into_inner();
            self.read_only(&req.name)?;
            let expected = if req.etag.is_empty() {
                None
            } else {
                Some(parse_etag(&req.etag, "etag")?)
            };
            let _write = self.writes.lock().await;
            let before = self
                .store
                .get_policy(&req.name)
                .await
                .map_err(store_error)?;
            rollout::refuse_during_rollout(&self.rollouts, &req.name).await?;
            self.store
                .delete_policy(&req.name, expected)
                .await
                .map_err(store_error)?;
            self.reload().await?;
            tracing::info!(policy = %req.name, "policy deleted");
            let before_etag = expected.map_or_else(
                || before.map(|b| b.etag()).unwrap_or_default(),
                |v| format!("v{v}"),
            );
            self.audit(
                audit::Entry::new(actor, "DeletePolicy", "policy", &req.name)
                    .with_etags(before_etag, "")
                    .with_detail("deleted"),
            )
            .await;
            Ok(Response::new(pb::DeletePolicyResponse {}))
        }
        .await
        .map_err(fail)
    }

    async fn validate_policy(
        &self,
        request: Request<pb::ValidatePolicyRequest>,
    ) -> AdminResult<pb::ValidatePolicyResponse> {
        let Some(p) = request.into_inner().policy else {
            return Ok(Response::new(pb::ValidatePolicyResponse {
                valid: false,
                violations: vec![pb::PolicyViolation {
                    field: "policy".into(),
                    description: "is required".into(),
                }],
            }));
        };
        let (spec, violations) = convert_admin::policy_in(p, "policy");
        let violations = match self.check(&spec, violations) {
            Ok(()) => Vec::new(),
            Err(GatewayError::InvalidArgument(v)) => v,
            Err(other) => return Err(fail(other)),
        };
        Ok(Response::new(pb::ValidatePolicyResponse {
            valid: violations.is_empty(),
            violations: violations
                .into_iter()
                .map(|v| pb::PolicyViolation {
                    field: v.field,
                    description: v.description,
                })
                .collect(),
        }))
    }

    async fn explain_route(
        &self,
        request: Request<pb::ExplainRouteRequest>,
    ) -> AdminResult<pb::ExplainRouteResponse> {
        async {
            let req = request
                .into_inner()
                .request
                .ok_or_else(|| GatewayError::invalid("request", "is required"))?;
            let req = convert::chat_request(req).map_err(|e| match e {
                GatewayError::InvalidArgument(v) => GatewayError::InvalidArgument(
                    v.into_iter()
                        .map(|f| FieldViolation::new(format!("request.{}", f.field), f.description))
                        .collect(),
                ),
                other => other,
            })?;
            let explanation = self.router.load().explain(&req)?;
            Ok(Response::new(convert_admin::explanation_out(explanation)))
        }
        .await
        .map_err(fail)
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> AdminResult<pb::GetUsageResponse> {
        async {
            let req = request.into_inner();
            let (start, end) = time_range(req.start_time, req.end_time)?;
            let mut violations = Vec::new();
            for (i, dim) in req.group_by.iter().enumerate() {
                if !crate::ledger::valid_dimension(dim) {
                    violations.push(FieldViolation::new(
                        format!("group_by[{i}]"),
                        format!("`{dim}` is not one of {USAGE_DIMENSIONS}"),
                    ));
                }
            }
            for dim in req.filter.keys() {
                if !crate::ledger::valid_dimension(dim) {
                    violations.push(FieldViolation::new(
                        format!("filter[{dim}]"),
                        format!("`{dim}` is not one of {USAGE_DIMENSIONS}"),
                    ));
                }
            }
            if !violations.is_empty() {
                return Err(GatewayError::InvalidArgument(violations));
            }
            // Aggregated by the database over the per-minute rollups.
            // Grouped by a guardrail dimension, the total counts the calls that had a
            // decision (matching the filter), each once, like the groups.
            let mut query = crate::ledger::UsageQuery {
                from_ms: start,
                to_ms: end,
                group_by: Vec::new(),
                filter: req.filter.into_iter().collect(),
                guardrail_calls: crate::ledger::names_guardrails(
                    req.group_by.iter().map(String::as_str),
                ),
            };
            let total = self
                .store
                .usage_groups(&query)
                .await
                .map_err(|e| store_error(e.into()))?
                .pop()
                .map(|g| g.totals)
                .unwrap_or_default();
            let mut out = Vec::new();
            if !req.group_by.is_empty() {
                query.group_by = req.group_by.clone();
                let groups = self
                    .store
                    .usage_groups(&query)
                    .await
                    .map_err(|e| store_error(e.into()))?;
                out = groups
                    .into_iter()
                    .map(|g| pb::UsageGroup {
                        key: req.group_by.iter().cloned().zip(g.key).collect(),
                        totals: Some(convert_admin::totals_out(&g.totals)),
                    })
                    .collect();
            }
            out.sort_by(|a, b| {
                let cost = |g: &pb::UsageGroup| g.totals.as_ref().map_or(0.0, |t| t.cost_usd);
                cost(b).total_cmp(&cost(a))
            });
            Ok(Response::new(pb::GetUsageResponse {
                groups: out,
                total: Some(convert_admin::totals_out(&total)),
            }))
        }
        .await
        .map_err(fail)
    }

    type ExportUsageStream = ExportStream;

    async fn export_usage(
        &self,
        request: Request<pb::ExportUsageRequest>,
    ) -> AdminResult<ExportStream> {
        let req = request.into_inner();
        let (start, end) = time_range(req.start_time, req.end_time).map_err(fail)?;
        // Page by page with a keyset cursor: one page in memory at a time, fetched when
        // the caller has taken the previous one.
        let store = self.store.clone();
        let pages = futures_util::stream::unfold(Some(None), move |cursor| {
            let store = store.clone();
            async move {
                let after = cursor?;
                match store.usage_page(start, end, after, EXPORT_PAGE).await {
                    Ok(page) if page.is_empty() => None,
                    Ok(page) => {
                        let next = (page.len() == EXPORT_PAGE)
                            .then(|| page.last().map(|(id, r)| (r.time_ms, *id)));
                        let records = page
                            .iter()
                            .map(|(_, r)| convert_admin::record_out(r))
                            .collect();
                        Some((Ok(pb::ExportUsageResponse { records }), next))
                    }
                    Err(e) => Some((Err(fail(store_error(e.into()))), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(pages)))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> AdminResult<pb::CreateKeyResponse> {
        async {
            let actor = actor(&request);
            let key = request
                .into_inner()
                .key
                .ok_or_else(|| GatewayError::invalid("key", "is required"))?;
            let spec = convert_admin::key_in(key, "key")?;
            let (id, secret) = auth::new_secret()?;
            let _write = self.writes.lock().await;
            let record = self
                .store
                .create_key(id, spec, auth::hash_secret(&secret))
                .await
                .map_err(store_error)?;
            self.reload_keys().await?;
            tracing::info!(key = %record.spec.name, owner = %record.spec.owner, "key created");
            let scopes: Vec<&str> = record.spec.scopes.iter().map(|s| s.name()).collect();
            let detail = format!(
                "created key id {} (owner `{}`, scopes {})",
                record.id,
                record.spec.owner,
                scopes.join(", ")
            );
            self.audit(
                audit::Entry::new(actor, "CreateKey", "key", &record.spec.name)
                    .with_etags("", record.etag())
                    .with_detail(detail),
            )
            .await;
            Ok(Response::new(pb::CreateKeyResponse {
                key: Some(self.key_out(&record)),
                secret,
            }))
        }
        .await
        .map_err(fail)
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> AdminResult<pb::ListKeysResponse> {
        let owner = request.into_inner().owner;
        let keys = self
            .store
            .list_keys()
            .await
            .map_err(|e| fail(store_error(e)))?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys
                .iter()
                .filter(|k| owner.is_empty() || k.spec.owner == owner)
                .map(|k| self.key_out(k))
                .collect(),
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> AdminResult<pb::GetKeyResponse> {
        let name = request.into_inner().name;
        let keys = self
            .store
            .list_keys()
            .await
            .map_err(|e| fail(store_error(e)))?;
        let key = keys.iter().find(|k| k.spec.name == name).ok_or_else(|| {
            fail(store_error(crate::store::StoreError::Key(format!(
                "no key named `{name}`"
            ))))
        })?;
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(self.key_out(key)),
        }))
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> AdminResult<pb::UpdateKeyResponse> {
        async {
            let actor = actor(&request);
            let key = request
                .into_inner()
                .key
                .ok_or_else(|| GatewayError::invalid("key", "is required"))?;
            if key.etag.is_empty() {
                return Err(GatewayError::invalid(
                    "key.etag",
                    "is required: send the etag you are replacing",
                ));
            }
            let version = parse_etag(&key.etag, "key.etag")?;
            let spec = convert_admin::key_in(key, "key")?;
            let _write = self.writes.lock().await;
            let before = self
                .store
                .list_keys()
                .await
                .map_err(store_error)?
                .into_iter()
                .find(|k| k.spec.name == spec.name && k.version == version);
            let record = self
                .store
                .update_key(spec, version)
                .await
                .map_err(store_error)?;
            self.reload_keys().await?;
            tracing::info!(key = %record.spec.name, etag = %record.etag(), "key updated");
            let detail = before.map_or_else(String::new, |b| {
                audit::changed_fields(&b.spec, &record.spec)
            });
            self.audit(
                audit::Entry::new(actor, "UpdateKey", "key", &record.spec.name)
                    .with_etags(format!("v{version}"), record.etag())
                    .with_detail(detail),
            )
            .await;
            Ok(Response::new(pb::UpdateKeyResponse {
                key: Some(self.key_out(&record)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> AdminResult<pb::RevokeKeyResponse> {
        async {
            let actor = actor(&request);
            let name = request.into_inner().name;
            let _write = self.writes.lock().await;
            let etag_of = |keys: Vec<KeyRecord>| {
                keys.into_iter()
                    .find(|k| k.spec.name == name)
                    .map(|k| k.etag())
                    .unwrap_or_default()
            };
            let before = etag_of(self.store.list_keys().await.map_err(store_error)?);
            self.store.revoke_key(&name).await.map_err(store_error)?;
            self.reload_keys().await?;
            tracing::info!(key = %name, "key revoked");
            let after = etag_of(self.store.list_keys().await.map_err(store_error)?);
            self.audit(
                audit::Entry::new(actor, "RevokeKey", "key", &name)
                    .with_etags(before, after)
                    .with_detail("revoked"),
            )
            .await;
            Ok(Response::new(pb::RevokeKeyResponse {}))
        }
        .await
        .map_err(fail)
    }

    async fn list_providers(
        &self,
        _request: Request<pb::ListProvidersRequest>,
    ) -> AdminResult<pb::ListProvidersResponse> {
        let table = self.router.load();
        let now = tokio::time::Instant::now();
        Ok(Response::new(pb::ListProvidersResponse {
            providers: self
                .providers
                .iter()
                .map(|p| pb::ProviderStatus {
                    name: p.name.clone(),
                    kind: p.kind.clone(),
                    base_url: p.base_url.clone(),
                })
                .collect(),
            targets: table
                .health()
                .all()
                .into_iter()
                .map(|(provider, model, h)| {
                    convert_admin::health_out(provider, model, h.snapshot(now))
                })
                .collect(),
        }))
    }

    async fn reload_config(
        &self,
        request: Request<pb::ReloadConfigRequest>,
    ) -> AdminResult<pb::ReloadConfigResponse> {
        let actor = actor(&request);
        let reloader = self
            .reloader
            .as_ref()
            .ok_or_else(|| fail(crate::reload::ReloadError::NoSource.into()))?;
        let report = reloader.reload().await.map_err(|e| fail(e.into()))?;
        self.audit(reload_entry(actor, &report)).await;
        Ok(Response::new(pb::ReloadConfigResponse {
            reloaded: report.reloaded,
            restart_needed: report.restart_needed,
        }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> AdminResult<pb::GetRolloutResponse> {
        async {
            let policy = request.into_inner().policy;
            let view = self.rollouts.view(&policy).await?;
            Ok(Response::new(pb::GetRolloutResponse {
                rollout: Some(convert_admin::rollout_out(&view)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::PauseRolloutRequest>,
    ) -> AdminResult<pb::PauseRolloutResponse> {
        async {
            let actor = actor(&request);
            let policy = request.into_inner().policy;
            let _write = self.writes.lock().await;
            let view = self.rollouts.pause(&policy).await?;
            tracing::info!(policy = %policy, "rollout paused");
            self.audit(rollout_entry(actor, "PauseRollout", &view))
                .await;
            Ok(Response::new(pb::PauseRolloutResponse {
                rollout: Some(convert_admin::rollout_out(&view)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::ResumeRolloutRequest>,
    ) -> AdminResult<pb::ResumeRolloutResponse> {
        async {
            let actor = actor(&request);
            let policy = request.into_inner().policy;
            let _write = self.writes.lock().await;
            let view = self.rollouts.resume(&policy).await?;
            tracing::info!(policy = %policy, "rollout resumed");
            self.audit(rollout_entry(actor, "ResumeRollout", &view))
                .await;
            Ok(Response::new(pb::ResumeRolloutResponse {
                rollout: Some(convert_admin::rollout_out(&view)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::AbortRolloutRequest>,
    ) -> AdminResult<pb::AbortRolloutResponse> {
        async {
            let actor = actor(&request);
            let req = request.into_inner();
            let _write = self.writes.lock().await;
            let view = self.rollouts.abort(&req.policy, &req.reason).await?;
            self.reload().await?;
            tracing::info!(policy = %req.policy, "rollout aborted");
            let mut entry = rollout_entry(actor, "AbortRollout", &view);
            entry = entry.with_etags(
                format!("v{}", view.record.canary_version),
                format!("v{}", view.record.canary_version + 1),
            );
            self.audit(entry).await;
            Ok(Response::new(pb::AbortRolloutResponse {
                rollout: Some(convert_admin::rollout_out(&view)),
            }))
        }
        .await
        .map_err(fail)
    }

    async fn invalidate_cache(
        &self,
        request: Request<pb::InvalidateCacheRequest>,
    ) -> AdminResult<pb::InvalidateCacheResponse> {
        let actor = actor(&request);
        let r = request.into_inner();
        let older_than = match r.older_than.map(std::time::Duration::try_from) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(_)) => {
                return Err(fail(GatewayError::invalid(
                    "older_than",
                    "must not be negative",
                )));
            }
        };
        let filter = crate::cache::Invalidate {
            namespace: Some(r.namespace).filter(|n| !n.is_empty()),
            policy: Some(r.policy).filter(|p| !p.is_empty()),
            older_than,
        };
        let removed = match &self.cache {
            Some(cache) => cache.invalidate(&filter).await.map_err(|err| {
                fail(GatewayError::Unavailable {
                    reason: "SHARED_STATE_UNAVAILABLE",
                    message: format!("the cache was not invalidated: {err}"),
                    retry_after: None,
                })
            })?,
            None => 0,
        };
        tracing::info!(removed, ?filter, "response cache invalidated");
        let mut selection = Vec::new();
        if let Some(ns) = &filter.namespace {
            selection.push(format!("namespace={ns}"));
        }
        if let Some(p) = &filter.policy {
            selection.push(format!("policy={p}"));
        }
        if let Some(d) = filter.older_than {
            selection.push(format!("older_than={}s", d.as_secs()));
        }
        let resource = if selection.is_empty() {
            "all".to_owned()
        } else {
            selection.join(" ")
        };
        self.audit(
            audit::Entry::new(actor, "InvalidateCache", "cache", resource)
                .with_detail(format!("removed {removed} replies")),
        )
        .await;
        Ok(Response::new(pb::InvalidateCacheResponse { removed }))
    }

    async fn list_audit_log(
        &self,
        request: Request<pb::ListAuditLogRequest>,
    ) -> AdminResult<pb::ListAuditLogResponse> {
        async {
            let req = request.into_inner();
            let limit = match req.page_size {
                0 => 50,
                n => (n as usize).min(MAX_AUDIT_PAGE),
            };
            let before = if req.page_token.is_empty() {
                None
            } else {
                Some(
                    decode_token(&req.page_token)
                        .and_then(|t| {
                            let (time, id) = t.split_once(':')?;
                            Some((time.parse().ok()?, id.parse().ok()?))
                        })
                        .ok_or_else(|| {
                            GatewayError::invalid(
                                "page_token",
                                "is not a token from a previous page",
                            )
                        })?,
                )
            };
            let from_ms = req.start_time.as_ref().map_or(i64::MIN, to_ms);
            let to_ms = req.end_time.as_ref().map_or(i64::MAX, to_ms);
            if from_ms >= to_ms {
                return Err(GatewayError::invalid(
                    "start_time",
                    "must be before end_time",
                ));
            }
            let query = audit::Query {
                actor: req.actor,
                resource_kind: req.resource_kind,
                resource: req.resource,
                from_ms,
                to_ms,
                before,
                limit: limit + 1,
            };
            let mut records = self
                .auditor
                .list(&query)
                .await
                .map_err(|e| store_error(e.into()))?;
            let next_page_token = if records.len() > limit {
                records.truncate(limit);
                records
                    .last()
                    .map(|r| encode_token(&format!("{}:{}", r.time_ms, r.id)))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok(Response::new(pb::ListAuditLogResponse {
                entries: records.iter().map(convert_admin::audit_out).collect(),
                next_page_token,
            }))
        }
        .await
        .map_err(fail)
    }

    async fn get_experiment(
        &self,
        request: Request<pb::GetExperimentRequest>,
    ) -> AdminResult<pb::GetExperimentResponse> {
        async {
            let req = request.into_inner();
            if req.name.is_empty() {
                return Err(GatewayError::invalid("name", "must not be empty"));
            }
            let (start, end) = time_range(req.start_time, req.end_time)?;
            let defined = self.router.load().experiment_arms(&req.name);
            let report = self
                .store
                .experiment_report(&req.name, start, end, defined)
                .await
                .map_err(store_error)?
                .ok_or_else(|| GatewayError::NotFound {
                    reason: "EXPERIMENT_NOT_FOUND",
                    message: format!(
                        "no policy runs experiment `{}` and the range holds no calls of it",
                        req.name
                    ),
                })?;
            Ok(Response::new(super::convert_trial::report_out(&report)))
        }
        .await
        .map_err(fail)
    }

    async fn get_usage_content(
        &self,
        request: Request<pb::GetUsageContentRequest>,
    ) -> AdminResult<pb::GetUsageContentResponse> {
        async {
            let req = request.into_inner();
            if req.request_id.is_empty() {
                return Err(GatewayError::invalid("request_id", "must not be empty"));
            }
            let kept = self
                .store
                .usage_content(&req.request_id, super::access::now_ms())
                .await
                .map_err(|e| store_error(e.into()))?;
            Ok(Response::new(pb::GetUsageContentResponse {
                contents: kept.iter().map(convert_admin::content_out).collect(),
            }))
        }
        .await
        .map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        assert_eq!(
            decode_token(&encode_token("chat-eu.v2")).as_deref(),
            Some("chat-eu.v2")
        );
        assert_eq!(decode_token("zz"), None);
        assert_eq!(decode_token("abc"), None);
    }
}
