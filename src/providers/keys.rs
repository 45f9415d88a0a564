//! Provider credentials: a ring of API keys per provider, used in turn, with keys that were
//! refused or rate limited resting while the others carry on.
//!
//! The key set sits behind an [`ArcSwap`], so a reload swaps it atomically: a call in flight
//! keeps the [`ProviderKey`] it picked, new calls pick from the new set, and a retry after a
//! refused key picks from whatever set is current then, so a rotation never fails a call.
//!
//! Keys are never logged, never in errors and never in `Debug` output: a key is named by its
//! position in the set (`key_index`), and to other replicas by its fingerprint.
//!
//! With shared state, each rest is told to a [`KeyRestHook`] (the server publishes it) and
//! peers' rests arrive through [`KeyRing::rest_from_peer`], so every replica rests a key
//! together (see `crate::shared::rests`).

use std::{
    any::Any,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::{ErrorClass, ProviderError};
use crate::pacing::{Admit, Pacer};

/// How long a key rests after a 429 without `Retry-After`.
pub const DEFAULT_RATE_LIMIT_REST: Duration = Duration::from_secs(1);

/// How long a key rests after a 401 or 403, unless configured.
pub const DEFAULT_AUTH_REST: Duration = Duration::from_secs(300);

const REST_NONE: u8 = 0;
const REST_RATE_LIMITED: u8 = 1;
const REST_REFUSED: u8 = 2;

/// Why a provider API key rests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRestReason {
    /// A 429 (or a rate limit the auth saw) for this key.
    RateLimited,
    /// A 401 or 403: the provider refused the key.
    Refused,
}

impl KeyRestReason {
    /// The label in metrics and in shared rests: `rate_limited` or `refused`.
    pub fn label(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Refused => "refused",
        }
    }

    /// The reason a label names.
    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "rate_limited" => Some(Self::RateLimited),
            "refused" => Some(Self::Refused),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::RateLimited => REST_RATE_LIMITED,
            Self::Refused => REST_REFUSED,
        }
    }
}

/// Told when one of a ring's keys starts a rest on this replica: provider, the key's
/// [`ProviderKey::fingerprint`], why, how long; and when a reload ended a key's refusal
/// rest ([`KeyRestReason::Refused`] for [`Duration::ZERO`]). The server publishes both to
/// the other replicas.
#[derive(Clone)]
pub struct KeyRestHook(pub Arc<KeyRestFn>);

/// What a [`KeyRestHook`] calls.
pub type KeyRestFn = dyn Fn(&str, u64, KeyRestReason, Duration) + Send + Sync;

impl std::fmt::Debug for KeyRestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRestHook")
    }
}

/// One provider API key and its rest state.
pub struct ProviderKey {
    secret: String,
    /// Names the key's account for pacing without revealing it (SHA-256 of the secret).
    fingerprint: u64,
    /// Milliseconds since the ring's epoch until which the key rests.
    rest_until_ms: AtomicU64,
    /// Why it rests (`REST_*`).
    rest_reason: AtomicU8,
    /// What the provider's [`super::auth::Auth`] derived from the key (a header value, parsed
    /// credentials, a token cache), built on first use.
    state: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl ProviderKey {
    fn new(secret: String) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        Self {
            // Never 0: 0 is the account of a provider without keys.
            fingerprint: u64::from_be_bytes(first).max(1),
            secret,
            rest_until_ms: AtomicU64::new(0),
            rest_reason: AtomicU8::new(REST_NONE),
            state: OnceLock::new(),
        }
    }

    /// The secret, to put in a request header (and nowhere else).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The key's account name for pacing: the first 8 bytes of the secret's SHA-256.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The state an auth keeps for this key, made from the secret by `init` on first use.
    /// `None` only when another type was stored first (one ring serves one provider, so one
    /// auth, so this does not happen).
    pub fn state<T: Any + Send + Sync>(&self, init: impl FnOnce(&str) -> T) -> Option<&T> {
        self.state
            .get_or_init(|| Box::new(init(&self.secret)))
            .downcast_ref()
    }
}

impl std::fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProviderKey(<redacted>)")
    }
}

/// The keys of one provider at one time.
struct KeySet {
    keys: Vec<Arc<ProviderKey>>,
    next: AtomicUsize,
}

/// What [`KeyRing::pick`] found.
#[derive(Debug)]
pub enum Pick {
    /// The provider has no key: send the request without credentials.
    NoKey,
    /// Use this key (its position in the current set, for logs).
    Key(Arc<ProviderKey>, usize),
    /// Every key not yet tried rests; the error says why (RATE_LIMITED or AUTHENTICATION).
    AllResting(ProviderError),
    /// Every key was tried in this attempt.
    Exhausted,
}

/// The API keys of one provider, swappable at runtime.
pub struct KeyRing {
    provider: String,
    set: ArcSwap<KeySet>,
    auth_rest_ms: AtomicU64,
    epoch: Instant,
    /// The provider's outbound pacing, when on.
    pacer: OnceLock<Arc<Pacer>>,
    /// Told of every rest this replica starts.
    rest_hook: OnceLock<KeyRestHook>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("provider", &self.provider)
            .field("keys", &self.len())
            .finish()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl KeyRing {
    /// A ring for `provider` with `keys` (empty: requests carry no credentials), and the rest
    /// after a 401/403.
    pub fn new(provider: impl Into<String>, keys: Vec<String>, auth_rest: Duration) -> Self {
        Self {
            provider: provider.into(),
            set: ArcSwap::from_pointee(KeySet {
                keys: keys
                    .into_iter()
                    .map(|k| Arc::new(ProviderKey::new(k)))
                    .collect(),
                next: AtomicUsize::new(0),
            }),
            auth_rest_ms: AtomicU64::new(duration_ms(auth_rest)),
            epoch: Instant::now(),
            pacer: OnceLock::new(),
            rest_hook: OnceLock::new(),
        }
    }

    /// A ring with at most one key and the default rest.
    pub fn single(provider: impl Into<String>, key: Option<String>) -> Self {
        Self::new(provider, key.into_iter().collect(), DEFAULT_AUTH_REST)
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.set.load().keys.len()
    }

    /// Whether the provider has no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How long a key rests after a 401 or 403.
    pub fn auth_rest(&self) -> Duration {
        Duration::from_millis(self.auth_rest_ms.load(Ordering::Relaxed))
    }

    /// Whether the current keys are exactly `keys`, in order.
    pub fn same_keys(&self, keys: &[String]) -> bool {
        let set = self.set.load();
        set.keys.len() == keys.len() && set.keys.iter().zip(keys).all(|(a, b)| a.secret == *b)
    }

    /// Swaps in a new key set. Keys present before keep their rate-limit rest; rests after a
    /// refusal end (a reload is the operator saying "try again"), here and, through the
    /// rest hook, on the other replicas. Calls in flight keep the key they hold.
    pub fn replace(&self, keys: Vec<String>, auth_rest: Duration) {
        let old = self.set.load_full();
        let now = self.now_ms();
        let ended: Vec<u64> = old
            .keys
            .iter()
            .filter(|k| {
                k.rest_reason.load(Ordering::Relaxed) == REST_REFUSED
                    && k.rest_until_ms.load(Ordering::Relaxed) > now
                    && keys.contains(&k.secret)
            })
            .map(|k| k.fingerprint)
            .collect();
        let keys = keys
            .into_iter()
            .map(
                |secret| match old.keys.iter().find(|k| k.secret == secret) {
                    Some(existing)
                        if existing.rest_reason.load(Ordering::Relaxed) != REST_REFUSED =>
                    {
                        existing.clone()
                    }
                    _ => Arc::new(ProviderKey::new(secret)),
                },
            )
            .collect();
        self.auth_rest_ms
            .store(duration_ms(auth_rest), Ordering::Relaxed);
        self.set.store(Arc::new(KeySet {
            keys,
            next: AtomicUsize::new(0),
        }));
        if let Some(hook) = self.rest_hook.get() {
            for fingerprint in ended {
                (hook.0)(
                    &self.provider,
                    fingerprint,
                    KeyRestReason::Refused,
                    Duration::ZERO,
                );
            }
        }
    }

    /// Ends the refusal rest of the key with fingerprint `fingerprint` because a reload on
    /// another replica ended it there; a rate-limit rest stands.
    pub fn end_refusal_from_peer(&self, fingerprint: u64) {
        let set = self.set.load();
        let Some((index, key)) = set
            .keys
            .iter()
            .enumerate()
            .find(|(_, k)| k.fingerprint == fingerprint)
        else {
            return;
        };
        if key
            .rest_reason
            .compare_exchange(
                REST_REFUSED,
                REST_NONE,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            key.rest_until_ms.store(0, Ordering::Relaxed);
            tracing::info!(
                provider = %self.provider,
                key_index = index,
                "provider api key refusal rest ended: another replica reloaded its keys"
            );
        }
    }

    fn now_ms(&self) -> u64 {
        duration_ms(Instant::now().saturating_duration_since(self.epoch))
    }

    /// Paces the provider's calls with `pacer` (once; later calls keep the first).
    pub fn set_pacer(&self, pacer: Arc<Pacer>) {
        let _ = self.pacer.set(pacer);
    }

    /// The provider's pacing, when on.
    pub fn pacer(&self) -> Option<&Arc<Pacer>> {
        self.pacer.get()
    }

    /// Sets the hook told of every rest this replica starts (once; later calls are ignored).
    pub fn on_rest(&self, hook: KeyRestHook) {
        let _ = self.rest_hook.set(hook);
    }

    /// Asks the provider's pacing to admit an attempt on `model` of `tokens` that must start
    /// by `latest`, over the accounts of the keys that do not rest. `None` without pacing.
    pub fn pace(&self, model: &str, tokens: u64, now: Instant, latest: Instant) -> Option<Admit> {
        let pacer = self.pacer.get()?;
        let set = self.set.load();
        let at = self.now_ms();
        let mut keys: Vec<u64> = set
            .keys
            .iter()
            .filter(|k| k.rest_until_ms.load(Ordering::Relaxed) <= at)
            .map(|k| k.fingerprint)
            .collect();
        if keys.is_empty() {
            // Every key rests: the send reports why; pace as if on all of them.
            keys = set.keys.iter().map(|k| k.fingerprint).collect();
        }
        Some(pacer.admit(&keys, model, tokens, now, latest))
    }

    /// Like [`KeyRing::pick`], but the key with fingerprint `preferred` first (the key whose
    /// capacity pacing took), when it is in the set, not tried and not resting.
    pub fn pick_preferred(&self, tried: &[Arc<ProviderKey>], preferred: Option<u64>) -> Pick {
        if let Some(fp) = preferred {
            let set = self.set.load();
            let now = self.now_ms();
            if let Some((index, key)) = set.keys.iter().enumerate().find(|(_, k)| {
                k.fingerprint == fp
                    && k.rest_until_ms.load(Ordering::Relaxed) <= now
                    && !tried.iter().any(|t| Arc::ptr_eq(t, k))
            }) {
                return Pick::Key(key.clone(), index);
            }
        }
        self.pick(tried)
    }

    /// The next key in turn that does not rest and is not in `tried`.
    pub fn pick(&self, tried: &[Arc<ProviderKey>]) -> Pick {
        let set = self.set.load();
        let n = set.keys.len();
        if n == 0 {
            return Pick::NoKey;
        }
        let now = self.now_ms();
        let start = set.next.fetch_add(1, Ordering::Relaxed);
        let mut soonest: Option<(u64, u8)> = None;
        for i in 0..n {
            let index = (start.wrapping_add(i)) % n;
            let key = &set.keys[index];
            if tried.iter().any(|t| Arc::ptr_eq(t, key)) {
                continue;
            }
            let until = key.rest_until_ms.load(Ordering::Relaxed);
            if until <= now {
                return Pick::Key(key.clone(), index);
            }
            let reason = key.rest_reason.load(Ordering::Relaxed);
            // A rate-limited key comes back soonest; report the most hopeful one.
            soonest = Some(match soonest {
                Some((u, r)) if r == REST_RATE_LIMITED && reason != REST_RATE_LIMITED => (u, r),
                Some((u, r)) if r == reason && u <= until => (u, r),
                Some(_) | None => (until, reason),
            });
        }
        match soonest {
            None => Pick::Exhausted,
            Some((until, REST_RATE_LIMITED)) => Pick::AllResting(
                ProviderError::new(
                    ErrorClass::RateLimited,
                    "every api key of this provider is resting after rate limits",
                )
                .with_retry_after(Some(Duration::from_millis(until.saturating_sub(now)))),
            ),
            Some(_) => Pick::AllResting(ProviderError::new(
                ErrorClass::Authentication,
                "every api key of this provider was refused recently",
            )),
        }
    }

    /// Whether `err` says something about the key (rather than the request), so that another
    /// key may succeed.
    pub fn is_key_failure(err: &ProviderError) -> bool {
        matches!(
            err.class,
            ErrorClass::RateLimited | ErrorClass::Authentication | ErrorClass::Permission
        )
    }

    /// Lets `key` rest after `err`: a 429 for its retry-after (default 1 s), a 401/403 for the
    /// configured time. A ring with one key never rests it: there is no other key to carry
    /// on, and the target's own health already backs off.
    pub fn rest(&self, key: &ProviderKey, index: usize, err: &ProviderError) {
        if self.len() < 2 {
            return;
        }
        let (reason, rest) = match err.class {
            ErrorClass::RateLimited => (
                KeyRestReason::RateLimited,
                duration_ms(err.retry_after.unwrap_or(DEFAULT_RATE_LIMIT_REST)),
            ),
            ErrorClass::Authentication | ErrorClass::Permission => (
                KeyRestReason::Refused,
                self.auth_rest_ms.load(Ordering::Relaxed),
            ),
            _ => return,
        };
        key.rest_until_ms
            .store(self.now_ms().saturating_add(rest), Ordering::Relaxed);
        key.rest_reason.store(reason.code(), Ordering::Relaxed);
        tracing::warn!(
            provider = %self.provider,
            key_index = index,
            error_class = err.class.label(),
            rest_ms = rest,
            "provider api key rests; the others carry on"
        );
        metrics::counter!(
            crate::telemetry::names::PROVIDER_KEY_RESTS,
            "provider" => self.provider.clone(),
            "reason" => reason.label(),
            "source" => "local"
        )
        .increment(1);
        if let Some(hook) = self.rest_hook.get() {
            (hook.0)(
                &self.provider,
                key.fingerprint,
                reason,
                Duration::from_millis(rest),
            );
        }
    }

    /// Rests the key with fingerprint `fingerprint` for `rest` from now because another
    /// replica rested it (the hook is not told: the news came from there). A longer rest
    /// already running stands; a key this replica does not have, or a ring of one key (which
    /// never rests), is left alone.
    pub fn rest_from_peer(&self, fingerprint: u64, reason: KeyRestReason, rest: Duration) {
        let set = self.set.load();
        if set.keys.len() < 2 {
            return;
        }
        let Some((index, key)) = set
            .keys
            .iter()
            .enumerate()
            .find(|(_, k)| k.fingerprint == fingerprint)
        else {
            return;
        };
        let until = self.now_ms().saturating_add(duration_ms(rest));
        if key.rest_until_ms.fetch_max(until, Ordering::Relaxed) < until {
            key.rest_reason.store(reason.code(), Ordering::Relaxed);
        }
        tracing::info!(
            provider = %self.provider,
            key_index = index,
            reason = reason.label(),
            rest_ms = duration_ms(rest),
            "provider api key rests: another replica saw it fail"
        );
        metrics::counter!(
            crate::telemetry::names::PROVIDER_KEY_RESTS,
            "provider" => self.provider.clone(),
            "reason" => reason.label(),
            "source" => "peer"
        )
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> Vec<String> {
        list.iter().map(|k| (*k).to_owned()).collect()
    }

    fn picked(ring: &KeyRing, tried: &[Arc<ProviderKey>]) -> Arc<ProviderKey> {
        match ring.pick(tried) {
            Pick::Key(k, _) => k,
            other => panic!("expected a key, got {other:?}"),
        }
    }

    #[test]
    fn round_robin() {
        let ring = KeyRing::new("p", keys(&["a", "b", "c"]), DEFAULT_AUTH_REST);
        let order: Vec<String> = (0..6).map(|_| picked(&ring, &[]).secret.clone()).collect();
        assert_eq!(order, ["a", "b", "c", "a", "b", "c"]);
        assert!(matches!(
            KeyRing::new("p", vec![], DEFAULT_AUTH_REST).pick(&[]),
            Pick::NoKey
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_and_limited_keys_rest_while_others_carry_on() {
        let ring = KeyRing::new("p", keys(&["a", "b"]), Duration::from_secs(300));
        let a = picked(&ring, &[]);
        ring.rest(
            &a,
            0,
            &ProviderError::new(ErrorClass::Authentication, "refused"),
        );
        for _ in 0..4 {
            assert_eq!(picked(&ring, &[]).secret, "b");
        }
        let b = picked(&ring, &[]);
        ring.rest(
            &b,
            1,
            &ProviderError::new(ErrorClass::RateLimited, "slow down")
                .with_retry_after(Some(Duration::from_secs(2))),
        );
        // Both rest: the most hopeful reason wins, with when to come back.
        match ring.pick(&[]) {
            Pick::AllResting(err) => {
                assert_eq!(err.class, ErrorClass::RateLimited);
                assert_eq!(err.retry_after, Some(Duration::from_secs(2)));
            }
            other => panic!("expected all resting, got {other:?}"),
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(picked(&ring, &[]).secret, "b");
        tokio::time::advance(Duration::from_secs(300)).await;
        let tried = vec![picked(&ring, &[])];
        let other = picked(&ring, &tried);
        assert_ne!(tried[0].secret, other.secret);
        assert!(matches!(
            ring.pick(&[tried[0].clone(), other]),
            Pick::Exhausted
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn only_refused_keys_say_authentication() {
        let ring = KeyRing::new("p", keys(&["a", "b"]), Duration::from_secs(300));
        for i in 0..2 {
            let k = picked(&ring, &[]);
            ring.rest(&k, i, &ProviderError::new(ErrorClass::Permission, "no"));
        }
        match ring.pick(&[]) {
            Pick::AllResting(err) => assert_eq!(err.class, ErrorClass::Authentication),
            other => panic!("expected all resting, got {other:?}"),
        }
        // A single key never rests.
        let single = KeyRing::single("p", Some("a".into()));
        let k = picked(&single, &[]);
        single.rest(&k, 0, &ProviderError::new(ErrorClass::Authentication, "no"));
        assert_eq!(picked(&single, &[]).secret, "a");
    }

    #[tokio::test(start_paused = true)]
    async fn rests_are_told_to_the_hook_and_peer_rests_end_after_their_time() {
        let ring = KeyRing::new("p", keys(&["a", "b"]), Duration::from_secs(300));
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = told.clone();
        ring.on_rest(KeyRestHook(Arc::new(move |provider, fp, reason, rest| {
            sink.lock()
                .unwrap()
                .push((provider.to_owned(), fp, reason, rest));
        })));
        let a = picked(&ring, &[]);
        ring.rest(&a, 0, &ProviderError::new(ErrorClass::Permission, "no"));
        assert_eq!(
            told.lock().unwrap().as_slice(),
            [(
                "p".to_owned(),
                a.fingerprint(),
                KeyRestReason::Refused,
                Duration::from_secs(300)
            )]
        );
        // Another replica (its own ring, same secrets) rests `b` for 2 s after a 429.
        let b_fp = ProviderKey::new("b".into()).fingerprint();
        ring.rest_from_peer(b_fp, KeyRestReason::RateLimited, Duration::from_secs(2));
        assert_eq!(told.lock().unwrap().len(), 1, "a peer's rest is not echoed");
        match ring.pick(&[]) {
            Pick::AllResting(err) => assert_eq!(err.retry_after, Some(Duration::from_secs(2))),
            other => panic!("expected all resting, got {other:?}"),
        }
        // A shorter peer rest does not cut a longer one; an unknown key changes nothing.
        ring.rest_from_peer(a.fingerprint(), KeyRestReason::RateLimited, Duration::ZERO);
        ring.rest_from_peer(7, KeyRestReason::Refused, Duration::from_secs(600));
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..3 {
            assert_eq!(picked(&ring, &[]).secret, "b");
        }
        tokio::time::advance(Duration::from_secs(298)).await;
        let seen: Vec<String> = (0..2).map(|_| picked(&ring, &[]).secret.clone()).collect();
        assert!(seen.contains(&"a".to_owned()), "{seen:?}");
        assert_eq!(
            KeyRestReason::from_label(KeyRestReason::Refused.label()),
            Some(KeyRestReason::Refused)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replace_keeps_rate_limit_rests_and_forgets_refusals() {
        let ring = KeyRing::new("p", keys(&["a", "b", "c"]), DEFAULT_AUTH_REST);
        let a = picked(&ring, &[]);
        ring.rest(&a, 0, &ProviderError::new(ErrorClass::RateLimited, "slow"));
        let b = picked(&ring, &[]);
        ring.rest(&b, 1, &ProviderError::new(ErrorClass::Authentication, "no"));
        ring.replace(keys(&["a", "b", "d"]), DEFAULT_AUTH_REST);
        assert!(ring.same_keys(&keys(&["a", "b", "d"])));
        let seen: Vec<String> = (0..4).map(|_| picked(&ring, &[]).secret.clone()).collect();
        assert!(!seen.contains(&"a".to_owned()), "{seen:?}");
        assert!(seen.contains(&"b".to_owned()) && seen.contains(&"d".to_owned()));
        // The key a call in flight holds is still usable after the swap.
        assert_eq!(a.secret(), "a");
        let debug = format!("{a:?} {ring:?}");
        assert!(!debug.contains("\"a\""), "{debug}");
    }
}
