//! The semantic cache's vector index: per partition (the namespace and everything in the
//! request but its messages, see [`super::key::partition`]), the unit-length embeddings of
//! cached prompts, searched for the nearest one by cosine similarity.
//!
//! Each partition is one HNSW graph ([`super::hnsw`]) that takes every insert at once (no
//! batch rebuild, no unindexed buffer). A lookup quantizes the query to int8, searches the
//! graph with [`EF_SEARCH`] candidates under the partition's read lock, and re-ranks the
//! [`RERANK`] nearest live ones with the exact f32 vectors (a dot product: the vectors are
//! unit length). A lookup at a similarity threshold ([`SemanticIndex::lookup`]) can stop
//! after a first pass of [`FIRST_EF`] candidates when nothing it found is within
//! [`WIDEN_MARGIN`] of the threshold: a miss needs no exact nearest prompt, only the
//! knowledge that none is near. On data without structure there is nothing to tell a
//! miss from a hit not yet found, so a smaller first pass loses hits (at 100,000 prompts
//! of 384 dims, a first pass of 24 found 478 of 496 clustered hits and 317 of 410 random
//! ones, for 40% and 45% fewer distances on a miss); [`FIRST_EF`] is therefore the full
//! [`EF_SEARCH`] until real embeddings show the trade is worth it. An insert plans its links under the read lock and links under the write
//! lock, so lookups wait only for the linking.
//!
//! Invalidation leaves tombstones: each prompt has a `dead` flag, set by
//! [`SemanticIndex::invalidate`], so an invalidated prompt is never found again (a lookup
//! skips it and takes the next live one). Dead and expired prompts' nodes are re-used by
//! the partition's next inserts; a partition a quarter dead (or whose nodes were all
//! re-used once since its graph was built) is rebuilt without them on a blocking thread,
//! while lookups and inserts go on in the old graph (inserts made meanwhile are replayed
//! into the new one), and a partition left empty is dropped. Memory is bounded across
//! partitions: past `max_entries` prompts, an insert takes the place of the soonest to
//! expire in the largest partition (its own, or a tombstone there that a rebuild drops
//! once a sixteenth of that partition is dead); the index never holds more than an
//! eighth above the bound (inserts beyond it are not indexed).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::time::Instant;

use super::{
    hnsw::{Code, Graph, Near, Plan, Reach},
    key::CacheKey,
    store::Invalidate,
};
use crate::error::GatewayError;

/// Graph candidates a lookup keeps (HNSW's `ef`).
pub const EF_SEARCH: usize = 48;

/// Live graph candidates a lookup re-ranks with the exact vectors, nearest first.
pub const RERANK: usize = 8;

/// Graph candidates a threshold lookup's first pass keeps ([`SemanticIndex::lookup`]);
/// [`EF_SEARCH`] turns the first pass off.
pub const FIRST_EF: usize = EF_SEARCH;

/// How far below the similarity threshold a first pass's best prompt may be and still
/// widen the search: a lookup whose first pass found nothing above `threshold -
/// WIDEN_MARGIN` is a miss without the rest of the search.
pub const WIDEN_MARGIN: f32 = 0.5;

/// Most distances a lookup computes, per candidate kept (a bound on the worst case; a
/// lookup of `ef` 48 in a 100,000-prompt graph computes about 2,000).
pub const VISITS_PER_EF: usize = 128;

/// What [`SemanticIndex::lookup`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lookup {
    /// The most similar live prompt found and its similarity (maybe below the threshold:
    /// the caller decides).
    pub best: Option<(CacheKey, f32)>,
    /// Distances the graph search computed (its cost, independent of the machine).
    pub visits: usize,
    /// Whether the first pass found something near the threshold and went on.
    pub widened: bool,
}

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

/// A prompt's embedding, and what the call that made it cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embedding {
    /// The vector (any length; the cache normalizes it).
    pub vector: Vec<f32>,
    /// The embedding call's cost, when known (charged to the chat call's budget).
    pub cost_usd: Option<f64>,
}

/// Embeds prompt text for the semantic cache.
#[async_trait::async_trait]
pub trait Embedder: Send + Sync + 'static {
    /// The embedding of `text`, made for `call`.
    async fn embed(&self, text: &str, call: Attribution<'_>) -> Result<Embedding, GatewayError>;
}

/// A unit-length vector.
#[derive(Debug, Clone)]
pub struct Vector(Arc<[f32]>);

/// The dot product, with 16 independent sums (a single running sum is a chain of
/// dependent float additions the compiler may not reorder, so it never vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut sums = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in sums.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    sums.iter().sum::<f32>() + tail
}

impl Vector {
    /// `v` scaled to unit length; `None` for a zero or non-finite vector.
    pub fn unit(v: &[f32]) -> Option<Self> {
        let norm = dot(v, v).sqrt();
        (norm.is_finite() && norm > 0.0).then(|| Vector(v.iter().map(|x| x / norm).collect()))
    }

    /// Cosine similarity with `other` (0 when the dimensions differ).
    pub fn similarity(&self, other: &Vector) -> f32 {
        if self.0.len() != other.0.len() {
            return 0.0;
        }
        dot(&self.0, &other.0)
    }

    /// The components.
    pub fn as_slice(&self) -> &[f32] {
        &self.0
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

/// A graph node's prompt, with its exact vector and its tombstone (shared with the copy a
/// running rebuild holds, so a prompt invalidated meanwhile stays dead in the new graph).
#[derive(Debug, Clone)]
struct Slot {
    item: Indexed,
    vector: Vector,
    dead: Arc<AtomicBool>,
    /// Bumped each time the node is re-used (marks its older `expiry` entries stale).
    generation: u32,
}

impl Slot {
    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    fn live(&self, now: Instant) -> bool {
        self.item.expires > now && !self.is_dead()
    }
}

/// One partition: a graph whose node `i` holds `slots[i]`.
struct Inner {
    graph: Graph,
    slots: Vec<Slot>,
    /// The nodes by expiry, soonest first: (expires, stored, node, generation); an entry of
    /// another generation than its node's, or of a dead node, is stale.
    expiry: BinaryHeap<Reverse<(Instant, Instant, u32, u32)>>,
    /// Tombstoned nodes, to re-use.
    free: Vec<u32>,
    /// Nodes re-used since the graph was built.
    replaced: usize,
    /// While a rebuild runs: the slots it started from (later ones are replayed into the
    /// new graph); no node is re-used meanwhile.
    building: Option<usize>,
    /// Bumped when a rebuild swaps the graph (an insert planned on the old one plans again).
    epoch: u64,
    /// Dropped from the index, empty: an insert that holds it goes back to the map.
    removed: bool,
}

impl Inner {
    fn new(dims: usize) -> Self {
        Self {
            graph: Graph::new(dims),
            slots: Vec::new(),
            expiry: BinaryHeap::new(),
            free: Vec::new(),
            replaced: 0,
            building: None,
            epoch: 0,
            removed: false,
        }
    }

    fn append(&mut self, code: &Code, plan: &Plan, slot: Slot) {
        let id = self.graph.insert(code, plan);
        let item = &slot.item;
        self.expiry
            .push(Reverse((item.expires, item.stored, id, slot.generation)));
        self.slots.push(slot);
    }

    /// Plans and appends `slot` (for a graph no lookup sees yet).
    fn add(&mut self, slot: Slot) {
        let code = Code::new(slot.vector.as_slice());
        let plan = self.graph.plan(&code, Graph::random_level());
        self.append(&code, &plan, slot);
    }

    /// Re-uses node `id` for another prompt.
    fn put(&mut self, id: u32, code: &Code, plan: &Plan, vector: Vector, item: Indexed) {
        self.graph.replace(id, code, plan);
        let slot = &mut self.slots[id as usize];
        let generation = slot.generation.wrapping_add(1);
        self.expiry
            .push(Reverse((item.expires, item.stored, id, generation)));
        *slot = Slot {
            item,
            vector,
            dead: Arc::default(),
            generation,
        };
        self.replaced += 1;
    }

    /// The live node that expires next, and when (left in `expiry`).
    fn soonest(&mut self) -> Option<(u32, Instant)> {
        while let Some(&Reverse((expires, _, id, generation))) = self.expiry.peek() {
            let slot = &self.slots[id as usize];
            if slot.generation == generation && !slot.is_dead() {
                return Some((id, expires));
            }
            self.expiry.pop();
        }
        None
    }

    /// The live node that expires next, taken out of `expiry` (to re-use or tombstone).
    fn take_soonest(&mut self) -> Option<u32> {
        let (id, _) = self.soonest()?;
        self.expiry.pop();
        Some(id)
    }

    /// A node to re-use now: a tombstoned or an expired one (none while a rebuild runs).
    fn reusable(&mut self, now: Instant) -> Option<u32> {
        if self.building.is_some() {
            return None;
        }
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        match self.soonest() {
            Some((_, expires)) if expires <= now => self.take_soonest(),
            _ => None,
        }
    }

    /// Whether [`Inner::reusable`] would likely find a node.
    fn has_reusable(&self, now: Instant) -> bool {
        self.building.is_none()
            && (!self.free.is_empty()
                || self
                    .expiry
                    .peek()
                    .is_some_and(|Reverse((expires, ..))| *expires <= now))
    }

    /// Tombstones the live node that expires next (its node is re-used by the next insert,
    /// or dropped by a rebuild).
    fn evict(&mut self) {
        if let Some(id) = self.take_soonest() {
            self.slots[id as usize].dead.store(true, Ordering::Relaxed);
            self.free.push(id);
        }
    }

    /// Prompts held that are not tombstoned.
    fn alive(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

type Part = Arc<RwLock<Inner>>;
type Partitions = Mutex<HashMap<[u8; 32], Part>>;

/// The index of every partition.
pub struct SemanticIndex {
    partitions: Arc<Partitions>,
    /// Nodes in all partitions (tombstoned ones until re-used or dropped by a rebuild).
    held: Arc<AtomicUsize>,
    max_entries: usize,
    ef_search: usize,
    first_ef: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `n` from `held` (never below zero: a rebuild may finish after a [`SemanticIndex::clear`]).
fn release(held: &AtomicUsize, n: usize) {
    let _ = held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
        Some(h.saturating_sub(n))
    });
}

impl SemanticIndex {
    /// An index keeping at most `max_entries` prompts in all (the latest to expire).
    pub fn new(max_entries: usize) -> Self {
        Self {
            partitions: Arc::default(),
            held: Arc::default(),
            max_entries: max_entries.max(1),
            ef_search: EF_SEARCH,
            first_ef: FIRST_EF,
        }
    }

    /// Keeps `ef` graph candidates per lookup (default [`EF_SEARCH`]; for benchmarks).
    pub fn ef_search(mut self, ef: usize) -> Self {
        self.ef_search = ef.max(1);
        self
    }

    /// Keeps `ef` graph candidates in a threshold lookup's first pass (default
    /// [`FIRST_EF`]; at least 1, at most the lookup's `ef`; for benchmarks).
    pub fn first_ef(mut self, ef: usize) -> Self {
        self.first_ef = ef.max(1);
        self
    }

    fn partition(&self, id: &[u8; 32]) -> Option<Part> {
        lock(&self.partitions).get(id).cloned()
    }

    /// The live cached prompt most similar to `query` in partition `id`, with its
    /// similarity; invalidated and expired prompts are skipped. A full search (no first
    /// pass): what [`SemanticIndex::lookup`] finds when something is near.
    pub fn nearest(&self, id: &[u8; 32], query: &Vector, now: Instant) -> Option<(CacheKey, f32)> {
        self.lookup(id, query, f32::NEG_INFINITY, now).best
    }

    /// The live cached prompt most similar to `query` in partition `id`, searched only as
    /// far as a prompt of similarity `threshold` could be: a first pass of the graph
    /// keeps [`FIRST_EF`] candidates, and goes on to the full `ef` only when the best live
    /// one of them (by its exact vector) is within [`WIDEN_MARGIN`] of `threshold`. A hit
    /// is always decided on the exact vector, so a short search can miss a prompt, never
    /// serve a wrong one.
    pub fn lookup(&self, id: &[u8; 32], query: &Vector, threshold: f32, now: Instant) -> Lookup {
        let Some(partition) = self.partition(id) else {
            return Lookup::default();
        };
        let p = read(&partition);
        if p.graph.dims() != query.as_slice().len() {
            return Lookup::default();
        }
        // The most similar of the nearest live candidates, by the exact vectors.
        let best = |found: &[Near]| {
            found
                .iter()
                .map(|n| &p.slots[n.id as usize])
                .filter(|s| s.live(now))
                .take(RERANK)
                .map(|s| (s, s.vector.similarity(query)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
        };
        let reach = Reach {
            first_ef: self.first_ef.min(self.ef_search),
            ef: self.ef_search,
            max_visits: self.ef_search.saturating_mul(VISITS_PER_EF),
        };
        let found = p
            .graph
            .search_reach(&Code::new(query.as_slice()), reach, |first| {
                best(first).is_some_and(|(_, sim)| sim >= threshold - WIDEN_MARGIN)
            });
        Lookup {
            best: best(&found.near).map(|(s, sim)| (s.item.key.clone(), sim)),
            visits: found.visits,
            widened: found.widened,
        }
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

    /// Adds a cached prompt to its partition's graph, in the place of a dead or expired one
    /// when there is one; past the bound, in the place of the soonest to expire of the
    /// largest partition. A vector of another dimension than the partition's is not indexed.
    pub fn insert_indexed(&self, id: [u8; 32], vector: Vector, item: Indexed) {
        let dims = vector.as_slice().len();
        let code = Code::new(vector.as_slice());
        let now = Instant::now();
        let hard_limit = self.max_entries.saturating_add(self.max_entries / 8);
        let mut prompt = Some((vector, item));
        // Again only when a rebuild dropped the partition (empty) before it was locked.
        loop {
            let partition = lock(&self.partitions)
                .entry(id)
                .or_insert_with(|| Arc::new(RwLock::new(Inner::new(dims))))
                .clone();
            let mut evict_own = false;
            if self.held.load(Ordering::Relaxed) >= self.max_entries
                && !read(&partition).has_reusable(now)
            {
                match self.largest() {
                    Some((victim_id, victim)) if victim_id != id => self.evict(victim_id, victim),
                    _ => evict_own = true,
                }
            }
            let level = Graph::random_level();
            let (epoch, plan) = {
                let p = read(&partition);
                if p.graph.dims() != dims {
                    return;
                }
                (p.epoch, p.graph.plan(&code, level))
            };
            let mut p = write(&partition);
            if p.removed {
                continue;
            }
            let plan = if p.epoch == epoch {
                plan
            } else {
                p.graph.plan(&code, level)
            };
            let Some((vector, item)) = prompt.take() else {
                return;
            };
            let node = p.reusable(now).or_else(|| {
                (evict_own && p.building.is_none())
                    .then(|| p.take_soonest())
                    .flatten()
            });
            let rebuild = match node {
                Some(node) => {
                    p.put(node, &code, &plan, vector, item);
                    p.replaced >= p.slots.len().max(64)
                }
                None if self.held.load(Ordering::Relaxed) >= hard_limit => false,
                None => {
                    let slot = Slot {
                        item,
                        vector,
                        dead: Arc::default(),
                        generation: 0,
                    };
                    p.append(&code, &plan, slot);
                    self.held.fetch_add(1, Ordering::Relaxed);
                    false
                }
            };
            drop(p);
            if rebuild {
                self.rebuild(id, partition);
            }
            return;
        }
    }

    /// The partition holding the most live prompts.
    fn largest(&self) -> Option<([u8; 32], Part)> {
        lock(&self.partitions)
            .iter()
            .map(|(id, p)| (*id, p.clone(), read(p).alive()))
            .max_by_key(|(_, _, alive)| *alive)
            .map(|(id, p, _)| (id, p))
    }

    /// Tombstones the prompt of `partition` that expires next; rebuilds the partition once
    /// a sixteenth of it is dead.
    fn evict(&self, id: [u8; 32], partition: Part) {
        let compact = {
            let mut p = write(&partition);
            p.evict();
            p.building.is_none() && p.free.len() * 16 >= p.slots.len()
        };
        if compact {
            self.rebuild(id, partition);
        }
    }

    /// Rebuilds a partition's graph without its dead and expired prompts on a blocking
    /// thread (inserts made meanwhile are replayed into it); a partition left empty is
    /// dropped. Does nothing while one is running.
    fn rebuild(&self, id: [u8; 32], partition: Part) {
        let (slots, taken, dims) = {
            let mut p = write(&partition);
            if p.building.is_some() {
                return;
            }
            let taken = p.slots.len();
            p.building = Some(taken);
            (p.slots.clone(), taken, p.graph.dims())
        };
        let (partitions, held) = (self.partitions.clone(), self.held.clone());
        let build = move || {
            let now = Instant::now();
            let mut fresh = Inner::new(dims);
            for slot in slots.into_iter().filter(|s| s.live(now)) {
                fresh.add(slot);
            }
            let mut parts = lock(&partitions);
            let mut p = write(&partition);
            for slot in p.slots[taken..].iter().filter(|s| s.live(now)) {
                fresh.add(slot.clone());
            }
            // Invalidated while the graph was built (the tombstones are shared).
            fresh.free = (0..fresh.slots.len() as u32)
                .filter(|&n| fresh.slots[n as usize].is_dead())
                .collect();
            fresh.epoch = p.epoch + 1;
            release(&held, p.slots.len().saturating_sub(fresh.slots.len()));
            *p = fresh;
            if p.slots.is_empty() {
                p.removed = true;
                if parts.get(&id).is_some_and(|q| Arc::ptr_eq(q, &partition)) {
                    parts.remove(&id);
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            // Not work that must finish: a lost rebuild leaves the old graph in place.
            Ok(handle) => drop(handle.spawn_blocking(build)),
            Err(_) => build(),
        }
    }

    /// Tombstones the prompts `filter` matches (as of `now`); returns how many. A
    /// partition a quarter dead is rebuilt without them.
    pub fn invalidate(&self, filter: &Invalidate, now: Instant) -> usize {
        let all: Vec<([u8; 32], Part)> = lock(&self.partitions)
            .iter()
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        let mut total = 0;
        for (id, partition) in all {
            let rebuild = {
                let mut p = write(&partition);
                let Inner { slots, free, .. } = &mut *p;
                let mut killed = 0;
                for (n, s) in slots.iter().enumerate() {
                    if !s.is_dead() && filter.matches_prompt(&s.item, now) {
                        s.dead.store(true, Ordering::Relaxed);
                        free.push(n as u32);
                        killed += 1;
                    }
                }
                total += killed;
                killed > 0 && p.building.is_none() && p.free.len() * 4 >= p.slots.len()
            };
            if rebuild {
                self.rebuild(id, partition);
            }
        }
        total
    }

    /// Forgets every prompt.
    pub fn clear(&self) {
        lock(&self.partitions).clear();
        self.held.store(0, Ordering::Relaxed);
    }

    /// Prompts held, tombstoned ones not yet re-used or dropped included (for tests and
    /// benchmarks).
    pub fn len(&self) -> usize {
        lock(&self.partitions)
            .values()
            .map(|p| read(p).slots.len())
            .sum()
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
        lock(&self.partitions)
            .values()
            .any(|p| read(p).building.is_some())
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
    fn the_nearest_prompt_is_found() {
        let index = SemanticIndex::new(10_000);
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

    #[test]
    fn expired_and_invalidated_prompts_give_their_nodes_to_new_ones() {
        // No runtime: rebuilds run inline.
        let index = SemanticIndex::new(1_000);
        let ttl = Duration::from_secs(60);
        for n in 0..20 {
            // Expired as soon as stored.
            index.insert([1; 32], vector(n, 16), key(n), Instant::now());
        }
        for n in 20..40 {
            index.insert([1; 32], vector(n, 16), key(n), Instant::now() + ttl);
        }
        assert_eq!(index.len(), 20, "the expired prompts' nodes are re-used");
        for n in [20, 29, 39] {
            let (found, sim) = index
                .nearest(&[1; 32], &vector(n, 16), Instant::now())
                .unwrap();
            assert_eq!(found, key(n));
            assert!(sim > 0.999, "{sim}");
        }
        let all = Invalidate {
            namespace: Some("t".into()),
            ..Invalidate::default()
        };
        // One tombstone (of 20) is no reason to rebuild; its node is re-used next.
        index.insert([2; 32], vector(99, 16), key(99), Instant::now() + ttl);
        assert_eq!(index.invalidate(&all, Instant::now()), 21);
        assert_eq!(
            index.partitions(),
            0,
            "both partitions died and were dropped"
        );
        index.insert([1; 32], vector(50, 16), key(50), Instant::now() + ttl);
        assert_eq!(index.len(), 1);
        // Another dimension than the partition's is not indexed, nor found.
        index.insert([1; 32], vector(51, 8), key(51), Instant::now() + ttl);
        assert_eq!(index.len(), 1);
        assert!(
            index
                .nearest(&[1; 32], &vector(51, 8), Instant::now())
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
        let index = SemanticIndex::new(10_000);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let item = |ns: &str, n: u32, policy: &str| Indexed {
            key: key_in(ns, n),
            policy: Some(policy.into()),
            stored: now,
            expires: later,
        };
        // Prompt 0 and a near copy of it (1).
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
    fn a_threshold_lookup_widens_only_near_the_threshold_and_finds_what_nearest_finds() {
        let index = SemanticIndex::new(10_000).first_ef(4);
        let expires = Instant::now() + Duration::from_secs(60);
        let dims = 128;
        for n in 0..1_000 {
            index.insert([1; 32], vector(n, dims), key(n), expires);
        }
        let now = Instant::now();
        for n in [3, 333, 999] {
            // A stored prompt plus noise: near the threshold, so the search goes on.
            let base = vector(n, dims);
            let mut rng = fastrand::Rng::with_seed(u64::from(n));
            let noisy: Vec<f32> = base
                .as_slice()
                .iter()
                .map(|x| x + (rng.f32() - 0.5) * 0.02)
                .collect();
            let query = Vector::unit(&noisy).unwrap();
            let found = index.lookup(&[1; 32], &query, 0.95, now);
            assert!(found.widened, "{found:?}");
            let (key_found, sim) = found.best.clone().unwrap();
            assert_eq!(key_found, key(n));
            assert!(sim >= 0.95, "{sim}");
            assert_eq!(found.best, index.nearest(&[1; 32], &query, now));
        }
        // A random query is far below 0.95 (cosine ~0.3 at best in 128 dimensions): the
        // first pass decides the miss, computing fewer distances than a full search.
        let (mut short, mut long) = (0, 0);
        for n in 0..20 {
            let query = vector(50_000 + n, dims);
            let miss = index.lookup(&[1; 32], &query, 0.95, now);
            let full = index.lookup(&[1; 32], &query, f32::NEG_INFINITY, now);
            assert!(!miss.widened && full.widened);
            assert!(miss.best.unwrap().1 < 0.95 - WIDEN_MARGIN);
            short += miss.visits;
            long += full.visits;
        }
        assert!(short * 2 < long, "{short} vs {long} distances");
        // Nothing in another partition, nor of another dimension.
        assert_eq!(
            index.lookup(&[2; 32], &vector(1, dims), 0.95, now),
            Lookup::default()
        );
        assert_eq!(
            index.lookup(&[1; 32], &vector(1, 8), 0.95, now),
            Lookup::default()
        );
    }

    /// Visits and latency (debug: a hint only) of threshold lookups in a large index, by
    /// first pass, on random and clustered data: `LLMGW_SEMANTIC_ENTRIES` prompts (default
    /// 20,000) of 384 dims. `cargo test --lib lookup_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "minutes in a debug build; prints numbers, for tuning"]
    #[expect(clippy::print_stderr, reason = "the numbers are the point")]
    fn lookup_cost_at_scale() {
        let entries: u64 = std::env::var("LLMGW_SEMANTIC_ENTRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let (dims, threshold, queries) = (384, 0.95, 300u64);
        let noisy = |seed: u64, base: &Vector, amount: f32| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let v: Vec<f32> = base
                .as_slice()
                .iter()
                .map(|x| x + (rng.f32() - 0.5) * amount)
                .collect();
            Vector::unit(&v).unwrap()
        };
        let expires = Instant::now() + Duration::from_secs(3_600);
        for clustered in [false, true] {
            // Clustered: 1,000 centres, each prompt a centre plus noise (cosine ~0.7).
            let make = |n: u64| {
                if clustered {
                    noisy(n, &vector(900_000 + (n % 1_000) as u32, dims), 0.177)
                } else {
                    vector(n as u32, dims)
                }
            };
            let vectors: Vec<Vector> = (0..entries).map(make).collect();
            let mut indexes: Vec<(usize, SemanticIndex)> = [EF_SEARCH, 24, 16]
                .into_iter()
                .map(|first| (first, SemanticIndex::new(usize::MAX).first_ef(first)))
                .collect();
            let built = std::time::Instant::now();
            // One graph, shared: the first pass is a lookup setting only.
            for (n, v) in vectors.iter().enumerate() {
                indexes[0]
                    .1
                    .insert([1; 32], v.clone(), key(n as u32), expires);
            }
            let seconds = built.elapsed().as_secs_f64();
            let graph = indexes[0].1.partition(&[1; 32]).unwrap();
            for (_, index) in &mut indexes[1..] {
                lock(&index.partitions).insert([1; 32], graph.clone());
            }
            let miss = |n: u64| {
                if clustered {
                    // Its own noise too (a prompt's noise is seeded by its number).
                    noisy(5_000_000 + n, &vector(800_000 + n as u32, dims), 0.177)
                } else {
                    vector(700_000 + n as u32, dims)
                }
            };
            let near = |n: u64| {
                let i = fastrand::Rng::with_seed(n).usize(..vectors.len());
                (i, noisy(6_000_000 + n, &vectors[i], 0.045))
            };
            eprintln!("clustered {clustered}: {entries} prompts indexed in {seconds:.1} s");
            for (first, index) in &indexes {
                for kind in ["miss", "near"] {
                    let (mut visits, mut micros, mut hits, mut widened) =
                        (Vec::new(), Vec::new(), 0, 0);
                    for n in 0..queries {
                        let (target, query) = if kind == "miss" {
                            (None, miss(n))
                        } else {
                            let (i, q) = near(n);
                            (Some(i), q)
                        };
                        let started = std::time::Instant::now();
                        let found = index.lookup(&[1; 32], &query, threshold, Instant::now());
                        micros.push(started.elapsed().as_micros());
                        visits.push(found.visits);
                        widened += usize::from(found.widened);
                        let (k, sim) = found.best.unwrap();
                        if sim >= threshold {
                            // Never a false hit: a miss query is near nothing.
                            assert!(target.is_some(), "a hit for a miss query");
                            hits += usize::from(target.is_some_and(|i| k == key(i as u32)));
                        }
                    }
                    visits.sort_unstable();
                    micros.sort_unstable();
                    let q = |p: f64| ((queries - 1) as f64 * p) as usize;
                    eprintln!(
                        "  first ef {first:2}, {kind}: distances p50 {} p99 {}, debug us p50 {} p99 {}, widened {widened}, hits {hits}/{queries}",
                        visits[q(0.5)],
                        visits[q(0.99)],
                        micros[q(0.5)],
                        micros[q(0.99)],
                    );
                }
            }
        }
    }

    #[test]
    fn the_index_holds_at_most_its_bound_across_partitions() {
        let max = 64;
        let index = SemanticIndex::new(max);
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
            // Tombstones wait for a rebuild: at most an eighth over the bound.
            assert!(
                index.len() <= max + max / 8,
                "{} held after {n}",
                index.len()
            );
        }
        // The newest prompt of the big partition is still found.
        let (found, _) = index
            .nearest(&[0; 32], &vector(998, 8), Instant::now())
            .unwrap();
        assert_eq!(found, key(998));
    }
}
