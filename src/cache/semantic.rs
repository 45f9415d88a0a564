//! The semantic cache's vector index: per partition (the namespace and everything in the
//! request but its messages, see [`super::key::partition`]), the unit-length embeddings of
//! cached prompts, searched for the nearest one by cosine similarity.
//!
//! Each partition is an HNSW graph (`instant-distance`, built from a batch) plus a small
//! buffer of the prompts added since, scanned exactly. When the buffer holds more than
//! [`REBUILD_AT`] (or a quarter of the graph), the graph is rebuilt with them on a blocking
//! thread while lookups go on with the old graph and the buffer. A lookup's cost is one
//! HNSW search (logarithmic in the entries) and a scan of at most the buffer.
//!
//! Invalidation leaves tombstones: each prompt has a `dead` flag, set by
//! [`SemanticIndex::invalidate`] in the graph and the buffer alike, so an invalidated prompt
//! is never found again (a lookup skips it and takes the next live one); a partition whose
//! prompts are a quarter dead is rebuilt without them. Memory is bounded across partitions:
//! the index holds at most `max_entries` prompts (plus the inserts made while a trimming
//! rebuild runs, never more than an eighth above): past it, the largest partition (or the
//! one being inserted into) is rebuilt without its dead, expired and soonest-expiring
//! prompts, and a partition left empty is dropped.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use instant_distance::{Builder, HnswMap, Point, Search};
use tokio::time::Instant;

use super::{key::CacheKey, store::Invalidate};
use crate::error::GatewayError;

/// Buffered prompts that trigger a rebuild of a partition's graph (also once they are a
/// quarter of it).
pub const REBUILD_AT: usize = 512;

/// Graph candidates a lookup looks at, nearest first, for a live one.
const CANDIDATES: usize = 16;

/// Who a semantic lookup's embedding call is made for (its ledger record).
#[derive(Debug, Clone, Copy)]
pub struct Attribution<'a> {
    /// The chat call's request id.
    pub request_id: &'a str,
    /// The gateway key that made the call (empty without one).
    pub key: &'a str,
    /// The chat request's tags.
    pub tags: &'a std::collections::BTreeMap<String, String>,
}

/// Embeds prompt text for the semantic cache.
#[async_trait::async_trait]
pub trait Embedder: Send + Sync + 'static {
    /// The embedding of `text` (any length; it is normalized here), made for `call`.
    async fn embed(&self, text: &str, call: Attribution<'_>) -> Result<Vec<f32>, GatewayError>;
}

/// A unit-length vector.
#[derive(Debug, Clone)]
pub struct Vector(Arc<[f32]>);

impl Vector {
    /// `v` scaled to unit length; `None` for a zero or non-finite vector.
    pub fn unit(v: &[f32]) -> Option<Self> {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        (norm.is_finite() && norm > 0.0).then(|| Vector(v.iter().map(|x| x / norm).collect()))
    }

    /// Cosine similarity with `other` (0 when the dimensions differ).
    pub fn similarity(&self, other: &Vector) -> f32 {
        if self.0.len() != other.0.len() {
            return 0.0;
        }
        self.0.iter().zip(other.0.iter()).map(|(a, b)| a * b).sum()
    }

    /// The components.
    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }
}

impl Point for Vector {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - self.similarity(other)
    }
}

/// A cached prompt, as the index keeps it.
#[derive(Debug, Clone)]
pub struct Indexed {
    /// The exact key of the cached reply.
    pub key: CacheKey,
    /// The policy the reply was made for (for invalidation).
    pub policy: Option<Arc<str>>,
    /// When the reply was stored.
    pub stored: Instant,
    /// When it expires.
    pub expires: Instant,
}

/// What a vector points to, with its tombstone (shared by every copy of the slot, so a
/// prompt invalidated during a rebuild stays dead in the new graph).
#[derive(Debug, Clone)]
struct Slot {
    item: Indexed,
    dead: Arc<AtomicBool>,
}

impl Slot {
    fn live(&self, now: Instant) -> bool {
        self.item.expires > now && !self.dead.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Partition {
    graph: Option<Arc<HnswMap<Vector, Slot>>>,
    /// Added since the graph was built, oldest first.
    fresh: Vec<(Vector, Slot)>,
    /// Tombstoned prompts not yet dropped by a rebuild.
    dead: usize,
    building: bool,
}

impl Partition {
    fn len(&self) -> usize {
        self.fresh.len() + self.graph.as_ref().map_or(0, |g| g.values.len())
    }
}

type Partitions = Mutex<HashMap<[u8; 32], Arc<Mutex<Partition>>>>;

/// The index of every partition.
pub struct SemanticIndex {
    partitions: Arc<Partitions>,
    /// Prompts held in all partitions (dead ones until a rebuild drops them).
    held: Arc<AtomicUsize>,
    max_entries: usize,
    rebuild_at: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `n` from `held` (never below zero: a rebuild may finish after a [`SemanticIndex::clear`]).
fn release(held: &AtomicUsize, n: usize) {
    let _ = held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
        Some(h.saturating_sub(n))
    });
}

impl SemanticIndex {
    /// An index keeping at most `max_entries` prompts in all (the newest).
    pub fn new(max_entries: usize) -> Self {
        Self {
            partitions: Arc::default(),
            held: Arc::default(),
            max_entries: max_entries.max(1),
            rebuild_at: REBUILD_AT,
        }
    }

    /// Rebuilds a graph once `n` prompts are buffered (default [`REBUILD_AT`]).
    pub fn rebuild_at(mut self, n: usize) -> Self {
        self.rebuild_at = n.max(1);
        self
    }

    fn partition(&self, id: &[u8; 32]) -> Option<Arc<Mutex<Partition>>> {
        lock(&self.partitions).get(id).cloned()
    }

    /// The live cached prompt most similar to `query` in partition `id`, with its
    /// similarity; invalidated and expired prompts are skipped.
    pub fn nearest(&self, id: &[u8; 32], query: &Vector, now: Instant) -> Option<(CacheKey, f32)> {
        let partition = self.partition(id)?;
        let (graph, mut best) = {
            let p = lock(&partition);
            let best = p
                .fresh
                .iter()
                .filter(|(_, s)| s.live(now))
                .map(|(v, s)| (s, v.similarity(query)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(s, sim)| (s.item.key.clone(), sim));
            (p.graph.clone(), best)
        };
        if let Some(graph) = graph {
            let mut search = Search::default();
            // The nearest live one of the few nearest, in order.
            if let Some(item) = graph
                .search(query, &mut search)
                .take(CANDIDATES)
                .find(|item| item.value.live(now))
            {
                let sim = 1.0 - item.distance;
                if best.as_ref().is_none_or(|(_, b)| sim > *b) {
                    best = Some((item.value.item.key.clone(), sim));
                }
            }
        }
        best
    }

    /// Adds a cached prompt expiring at `expires` (stored now, for no policy).
    pub fn insert(&self, id: [u8; 32], vector: Vector, key: CacheKey, expires: Instant) {
        self.insert_indexed(
            id,
            vector,
            Indexed {
                key,
                policy: None,
                stored: Instant::now(),
                expires,
            },
        );
    }

    /// Adds a cached prompt; rebuilds the partition's graph in the background when its
    /// buffer is full, and trims the index when it holds more than its bound.
    pub fn insert_indexed(&self, id: [u8; 32], vector: Vector, item: Indexed) {
        let hard_limit = self.max_entries.saturating_add(self.max_entries / 8);
        if self.held.load(Ordering::Relaxed) >= hard_limit {
            // Full even with the slack a running trim allows: not indexed.
            return;
        }
        let (partition, full, len) = {
            let mut parts = lock(&self.partitions);
            let partition = parts.entry(id).or_default().clone();
            // Locked before the map is let go, so a rebuild cannot drop it as empty first.
            let mut p = lock(&partition);
            drop(parts);
            p.fresh.push((
                vector,
                Slot {
                    item,
                    dead: Arc::default(),
                },
            ));
            self.held.fetch_add(1, Ordering::Relaxed);
            let graph_len = p.graph.as_ref().map_or(0, |g| g.values.len());
            let full = !p.building && p.fresh.len() >= self.rebuild_at.max(graph_len / 4);
            let len = p.len();
            drop(p);
            (partition, full, len)
        };
        let held = self.held.load(Ordering::Relaxed);
        if held > self.max_entries {
            // Trim a little below the bound, so trims do not follow every insert.
            let over = held - self.max_entries + self.max_entries / 16;
            if len > over {
                self.rebuild(id, partition, len - over);
            } else if let Some((victim_id, victim, victim_len)) = self.largest() {
                self.rebuild(victim_id, victim, victim_len.saturating_sub(over));
            }
        } else if full {
            self.rebuild(id, partition, self.max_entries);
        }
    }

    /// The partition holding the most prompts.
    fn largest(&self) -> Option<([u8; 32], Arc<Mutex<Partition>>, usize)> {
        lock(&self.partitions)
            .iter()
            .map(|(id, p)| (*id, p.clone(), lock(p).len()))
            .max_by_key(|(_, _, len)| *len)
    }

    /// Rebuilds a partition's graph from its graph and buffer without dead and expired
    /// prompts, keeping at most `cap` (the latest to expire, then the newest), on a blocking thread; a
    /// partition left empty is dropped. Does nothing while one is running.
    fn rebuild(&self, id: [u8; 32], partition: Arc<Mutex<Partition>>, cap: usize) {
        let mut p = lock(&partition);
        if p.building {
            return;
        }
        p.building = true;
        let taken = p.fresh.len();
        let mut points: Vec<(Vector, Slot)> = p
            .graph
            .as_ref()
            .map(|g| {
                g.iter()
                    .map(|(pid, v)| (v.clone(), g.values[pid.into_inner() as usize].clone()))
                    .collect()
            })
            .unwrap_or_default();
        points.extend(p.fresh.iter().cloned());
        drop(p);
        let (partitions, held) = (self.partitions.clone(), self.held.clone());
        let build = move || {
            let now = Instant::now();
            let before = points.len();
            points.retain(|(_, s)| s.live(now));
            points.sort_by_key(|(_, s)| (s.item.expires, s.item.stored));
            let excess = points.len().saturating_sub(cap);
            points.drain(..excess);
            let kept = points.len();
            let graph = (kept > 0).then(|| {
                let (vectors, slots): (Vec<Vector>, Vec<Slot>) = points.into_iter().unzip();
                Arc::new(Builder::default().seed(1).build(vectors, slots))
            });
            let mut parts = lock(&partitions);
            let mut p = lock(&partition);
            p.graph = graph;
            // The buffer only grows while a rebuild runs: its first `taken` are in the graph.
            let done = taken.min(p.fresh.len());
            p.fresh.drain(..done);
            let dead = |s: &Slot| s.dead.load(Ordering::Relaxed);
            p.dead = p.fresh.iter().filter(|(_, s)| dead(s)).count()
                + p.graph
                    .as_ref()
                    .map_or(0, |g| g.values.iter().filter(|s| dead(s)).count());
            p.building = false;
            release(&held, before - kept);
            let empty = p.len() == 0;
            drop(p);
            if empty {
                parts.remove(&id);
            }
        };
        match tokio::runtime::Handle::try_current() {
            // Not work that must finish: a lost rebuild leaves the buffer to the next one.
            Ok(handle) => drop(handle.spawn_blocking(build)),
            Err(_) => build(),
        }
    }

    /// Tombstones the prompts `filter` matches (as of `now`); returns how many. A
    /// partition a quarter dead is rebuilt without them.
    pub fn invalidate(&self, filter: &Invalidate, now: Instant) -> usize {
        let all: Vec<([u8; 32], Arc<Mutex<Partition>>)> = lock(&self.partitions)
            .iter()
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        let mut total = 0;
        for (id, partition) in all {
            let rebuild = {
                let mut p = lock(&partition);
                let mut killed = 0;
                let mut kill = |s: &Slot| {
                    if !s.dead.load(Ordering::Relaxed) && filter.matches_prompt(&s.item, now) {
                        s.dead.store(true, Ordering::Relaxed);
                        killed += 1;
                    }
                };
                p.fresh.iter().for_each(|(_, s)| kill(s));
                if let Some(graph) = &p.graph {
                    graph.values.iter().for_each(&mut kill);
                }
                p.dead += killed;
                total += killed;
                killed > 0 && p.dead * 4 >= p.len()
            };
            if rebuild {
                self.rebuild(id, partition, self.max_entries);
            }
        }
        total
    }

    /// Forgets every prompt.
    pub fn clear(&self) {
        lock(&self.partitions).clear();
        self.held.store(0, Ordering::Relaxed);
    }

    /// Prompts held, graphs and buffers, tombstoned ones not yet dropped included (for
    /// tests and benchmarks).
    pub fn len(&self) -> usize {
        lock(&self.partitions).values().map(|p| lock(p).len()).sum()
    }

    /// Whether no prompt is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Partitions held.
    pub fn partitions(&self) -> usize {
        lock(&self.partitions).len()
    }

    /// Whether a partition's graph is being rebuilt.
    pub fn building(&self) -> bool {
        lock(&self.partitions).values().any(|p| lock(p).building)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(n: u32) -> CacheKey {
        let mut digest = [0u8; 32];
        digest[..4].copy_from_slice(&n.to_le_bytes());
        CacheKey {
            namespace: "t".into(),
            digest,
        }
    }

    fn vector(seed: u32, dims: usize) -> Vector {
        let mut rng = fastrand::Rng::with_seed(u64::from(seed));
        let v: Vec<f32> = (0..dims).map(|_| rng.f32() - 0.5).collect();
        Vector::unit(&v).unwrap()
    }

    #[test]
    fn the_nearest_prompt_is_found_in_the_buffer_and_the_graph() {
        let index = SemanticIndex::new(10_000).rebuild_at(40);
        let expires = Instant::now() + Duration::from_secs(60);
        for n in 0..130 {
            index.insert([1; 32], vector(n, 32), key(n), expires);
        }
        assert!(!index.building());
        for n in [0, 7, 45, 85, 125] {
            let (found, sim) = index
                .nearest(&[1; 32], &vector(n, 32), Instant::now())
                .unwrap_or_else(|| panic!("nothing found for {n}"));
            assert_eq!(found, key(n));
            assert!(sim > 0.999, "{sim}");
        }
        assert!(
            index
                .nearest(&[2; 32], &vector(0, 32), Instant::now())
                .is_none()
        );
        assert!(Vector::unit(&[0.0, 0.0]).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_prompts_are_not_found() {
        let index = SemanticIndex::new(100);
        index.insert(
            [1; 32],
            vector(1, 8),
            key(1),
            Instant::now() + Duration::from_secs(10),
        );
        assert!(
            index
                .nearest(&[1; 32], &vector(1, 8), Instant::now())
                .is_some()
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            index
                .nearest(&[1; 32], &vector(1, 8), Instant::now())
                .is_none()
        );
    }

    fn key_in(ns: &str, n: u32) -> CacheKey {
        CacheKey {
            namespace: ns.into(),
            ..key(n)
        }
    }

    #[test]
    fn invalidated_prompts_are_never_found_and_the_next_live_one_is() {
        let index = SemanticIndex::new(10_000).rebuild_at(8);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let item = |ns: &str, n: u32, policy: &str| Indexed {
            key: key_in(ns, n),
            policy: Some(policy.into()),
            stored: now,
            expires: later,
        };
        // Prompt 0 and a near copy of it (1), in the graph (rebuilt at 8) and the buffer.
        let base = vector(0, 16);
        let near: Vec<f32> = base.as_slice().iter().map(|x| x + 0.01).collect();
        index.insert_indexed([1; 32], base.clone(), item("a", 0, "old"));
        for n in 2..9 {
            index.insert_indexed([1; 32], vector(n, 16), item("a", n, "other"));
        }
        index.insert_indexed([1; 32], Vector::unit(&near).unwrap(), item("a", 1, "new"));
        assert_eq!(
            index.nearest(&[1; 32], &base, now).unwrap().0,
            key_in("a", 0)
        );
        let by_policy = Invalidate {
            policy: Some("old".into()),
            ..Invalidate::default()
        };
        assert_eq!(index.invalidate(&by_policy, now), 1);
        let (found, sim) = index.nearest(&[1; 32], &base, now).unwrap();
        assert_eq!(found, key_in("a", 1), "the dead prompt is skipped");
        assert!(sim > 0.9, "{sim}");
        // By namespace: another namespace's prompts stay.
        index.insert_indexed([2; 32], base.clone(), item("b", 0, "old"));
        let by_namespace = Invalidate {
            namespace: Some("a".into()),
            ..Invalidate::default()
        };
        assert_eq!(index.invalidate(&by_namespace, now), 8);
        assert!(index.nearest(&[1; 32], &base, now).is_none());
        assert!(index.nearest(&[2; 32], &base, now).is_some());
        // A partition that died entirely is rebuilt away (no runtime: inline).
        assert_eq!(index.partitions(), 1);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn the_index_holds_at_most_its_bound_across_partitions() {
        let max = 64;
        let index = SemanticIndex::new(max).rebuild_at(16);
        let expires = Instant::now() + Duration::from_secs(60);
        for n in 0..1_000u32 {
            // Many small partitions and one big one.
            let id = if n % 2 == 0 {
                [0; 32]
            } else {
                [(n % 50) as u8 + 1; 32]
            };
            let expires = expires + Duration::from_millis(u64::from(n));
            index.insert(id, vector(n, 8), key(n), expires);
            assert!(index.len() <= max, "{} held after {n}", index.len());
        }
        // The newest prompt of the big partition is still found.
        let (found, _) = index
            .nearest(&[0; 32], &vector(998, 8), Instant::now())
            .unwrap();
        assert_eq!(found, key(998));
    }
}
