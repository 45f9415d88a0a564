//! The semantic cache's vector index: per partition (the namespace and everything in the
//! request but its messages, see [`super::key::partition`]), the unit-length embeddings of
//! cached prompts, searched for the nearest one by cosine similarity.
//!
//! Each partition is an HNSW graph (`instant-distance`, built from a batch) plus a small
//! buffer of the prompts added since, scanned exactly. When the buffer holds more than
//! [`REBUILD_AT`] (or a quarter of the graph), the graph is rebuilt with them on a blocking
//! thread while lookups go on with the old graph and the buffer. A lookup's cost is one
//! HNSW search (logarithmic in the entries) and a scan of at most the buffer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use instant_distance::{Builder, HnswMap, Point, Search};
use tokio::time::Instant;

use super::key::CacheKey;
use crate::error::GatewayError;

/// Buffered prompts that trigger a rebuild of a partition's graph (also once they are a
/// quarter of it).
pub const REBUILD_AT: usize = 512;

/// Embeds prompt text for the semantic cache.
#[async_trait::async_trait]
pub trait Embedder: Send + Sync + 'static {
    /// The embedding of `text` (any length; it is normalized here).
    async fn embed(&self, text: &str) -> Result<Vec<f32>, GatewayError>;
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
}

impl Point for Vector {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - self.similarity(other)
    }
}

/// What a vector points to: the exact key of the cached reply.
#[derive(Debug, Clone)]
struct Slot {
    key: CacheKey,
    expires: Instant,
}

#[derive(Default)]
struct Partition {
    graph: Option<Arc<HnswMap<Vector, Slot>>>,
    /// Added since the graph was built, oldest first.
    fresh: Vec<(Vector, Slot)>,
    building: bool,
}

/// The index of every partition.
pub struct SemanticIndex {
    partitions: Mutex<HashMap<[u8; 32], Arc<Mutex<Partition>>>>,
    max_entries: usize,
    rebuild_at: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SemanticIndex {
    /// An index keeping at most `max_entries` prompts per partition (the newest).
    pub fn new(max_entries: usize) -> Self {
        Self {
            partitions: Mutex::new(HashMap::new()),
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
    /// similarity.
    pub fn nearest(&self, id: &[u8; 32], query: &Vector, now: Instant) -> Option<(CacheKey, f32)> {
        let partition = self.partition(id)?;
        let (graph, mut best) = {
            let p = lock(&partition);
            let best = p
                .fresh
                .iter()
                .filter(|(_, s)| s.expires > now)
                .map(|(v, s)| (s, v.similarity(query)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(s, sim)| (s.key.clone(), sim));
            (p.graph.clone(), best)
        };
        if let Some(graph) = graph {
            let mut search = Search::default();
            // The few nearest, in order: the first live one.
            for item in graph.search(query, &mut search).take(4) {
                if item.value.expires <= now {
                    continue;
                }
                let sim = 1.0 - item.distance;
                if best.as_ref().is_none_or(|(_, b)| sim > *b) {
                    best = Some((item.value.key.clone(), sim));
                }
                break;
            }
        }
        best
    }

    /// Adds a cached prompt; rebuilds the partition's graph in the background when its
    /// buffer is full.
    pub fn insert(&self, id: [u8; 32], vector: Vector, key: CacheKey, expires: Instant) {
        let partition = lock(&self.partitions).entry(id).or_default().clone();
        let mut p = lock(&partition);
        p.fresh.push((vector, Slot { key, expires }));
        let graph_len = p.graph.as_ref().map_or(0, |g| g.values.len());
        if p.building || p.fresh.len() < self.rebuild_at.max(graph_len / 4) {
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
        let max = self.max_entries;
        let build = move || {
            let now = Instant::now();
            points.retain(|(_, s)| s.expires > now);
            points.sort_by_key(|(_, s)| s.expires);
            let excess = points.len().saturating_sub(max);
            points.drain(..excess);
            let (vectors, slots): (Vec<Vector>, Vec<Slot>) = points.into_iter().unzip();
            let graph = Builder::default().seed(1).build(vectors, slots);
            let mut p = lock(&partition);
            p.graph = Some(Arc::new(graph));
            let done = taken.min(p.fresh.len());
            p.fresh.drain(..done);
            p.building = false;
        };
        match tokio::runtime::Handle::try_current() {
            // Not work that must finish: a lost rebuild leaves the buffer to the next one.
            Ok(handle) => drop(handle.spawn_blocking(build)),
            Err(_) => build(),
        }
    }

    /// Forgets every prompt (after an invalidation; the entries themselves are gone from
    /// the store, so a stale vector only costs a miss).
    pub fn clear(&self) {
        lock(&self.partitions).clear();
    }

    /// Prompts held, graph and buffers (for tests and benchmarks).
    pub fn len(&self) -> usize {
        lock(&self.partitions)
            .values()
            .map(|p| {
                let p = lock(p);
                p.fresh.len() + p.graph.as_ref().map_or(0, |g| g.values.len())
            })
            .sum()
    }

    /// Whether no prompt is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
}
