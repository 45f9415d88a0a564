//! The semantic index's graph: HNSW (Malkov & Yashunin, 2018) over int8-quantized unit
//! vectors, taking inserts one at a time and re-using nodes for new vectors.
//!
//! Each node's vector is kept as `i8` codes with one scale (a quarter of the f32 bytes: a
//! 384-dim node is 6 cache lines instead of 24), and a distance is one minus the codes'
//! integer dot product times both scales (the caller re-ranks the best candidates with
//! the exact vectors). Layer 0 holds up to [`M0`] links per node in one flat array, upper
//! layers up to [`M`]. A new node links to the neighbours the paper's heuristic picks
//! (algorithm 4) from an [`EF_CONSTRUCTION`]-wide search, and each neighbour links back,
//! dropping its farthest link when full (distances are stored with the links, so linking
//! computes none). Planning an insert only reads the graph ([`Graph::plan`]), so the index
//! plans under a read lock and only links ([`Graph::insert`], [`Graph::replace`]) under a
//! write lock.
//!
//! A search's cost is the distances it computes ([`Found::visits`], independent of the
//! machine), each one a pass over two nodes' codes: `dot_i8` sums in 32 independent
//! lanes, which LLVM turns into SSE2 `pmaddwd` on any x86_64 (about 35 ns for 384 dims,
//! a third of a plain running sum), and before the distances to a node's unvisited
//! neighbours are computed, one byte of each of their codes' cache lines is read
//! (`Graph::touch`), so the misses of a large graph overlap instead of coming one
//! after the other. A lookup can stop early ([`Graph::search_reach`]): a first pass keeps
//! few candidates, and goes on from where it stopped to the full `ef` only when its
//! caller says what it found matters (the cache: something near the similarity
//! threshold); a bound on distances caps the worst case.
//!
//! No crate fit: `instant-distance` builds a graph from a batch only (the index used to
//! rebuild it and scan the newest prompts exactly, 5 ms a lookup at 100,000), and the
//! incremental pure-Rust ones are unmaintained or bring heavy dependencies.

use std::{cell::RefCell, cmp::Ordering, cmp::Reverse, collections::BinaryHeap};

/// Links per node on the upper layers.
pub const M: usize = 16;
/// Links per node on layer 0.
pub const M0: usize = 2 * M;
/// Candidates an insert's search keeps per layer.
pub const EF_CONSTRUCTION: usize = 64;
/// Highest layer a node gets.
const MAX_LEVEL: usize = 12;

/// A link to a node, with the distance between the two.
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    id: u32,
    dist: f32,
}

/// A node and its distance to a query; ordered by distance, then id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Near {
    /// One minus the (approximate) cosine similarity.
    pub dist: f32,
    /// The node.
    pub id: u32,
}

impl Eq for Near {}

impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.dist
            .total_cmp(&other.dist)
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A vector quantized to `i8` codes and one scale (component ~ code * scale).
#[derive(Debug, Clone)]
pub struct Code {
    codes: Vec<i8>,
    scale: f32,
}

impl Code {
    /// `v` quantized.
    pub fn new(v: &[f32]) -> Self {
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = if max > 0.0 && max.is_finite() {
            max / 127.0
        } else {
            1.0
        };
        let codes = v
            .iter()
            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
            .collect();
        Code { codes, scale }
    }
}

/// Components per step of [`dot_i8`]: 32 independent `i32` sums, the shape LLVM turns
/// into SSE2 `pmaddwd` (sign-extend to `i16`, multiply pairs, add into `i32` lanes) on any
/// x86_64 without target-cpu flags, and into `sdot`/`smlal` on aarch64.
const LANES: usize = 32;

/// The integer dot product of two codes (exact: 127² · 384 fits an i32 many times over).
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: i32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    let mut sums = [0i32; LANES];
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in sums.iter_mut().zip(x).zip(y) {
            *s += i32::from(x) * i32::from(y);
        }
    }
    sums.iter().sum::<i32>() + tail
}

/// Per-thread search state, kept between searches (no allocation per search).
#[derive(Default)]
struct Scratch {
    /// A node was visited by this search when its mark is `stamp`.
    marks: Vec<u32>,
    stamp: u32,
    /// Found nodes not yet expanded, nearest first.
    candidates: BinaryHeap<Reverse<Near>>,
    /// The best nodes found, farthest first.
    results: BinaryHeap<Near>,
    /// Nodes whose distance was computed but which are not among the results (rejected
    /// or pushed out by nearer ones): where a widened search starts from too.
    deferred: Vec<Near>,
    /// Distances computed by this search.
    visits: usize,
}

impl Scratch {
    fn begin(&mut self, nodes: usize) {
        if self.marks.len() < nodes {
            self.marks.resize(nodes, 0);
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.marks.fill(0);
            self.stamp = 1;
        }
        self.candidates.clear();
        self.results.clear();
        self.deferred.clear();
    }

    /// Keeps the `ef` nearest results; the others are deferred.
    fn trim(&mut self, ef: usize) {
        while self.results.len() > ef {
            if let Some(out) = self.results.pop() {
                self.deferred.push(out);
            }
        }
    }

    /// Takes the deferred nodes back, as results and candidates (for a larger `ef`).
    fn resume(&mut self) {
        for near in self.deferred.drain(..) {
            self.results.push(near);
            self.candidates.push(Reverse(near));
        }
    }

    /// Marks `id` visited; whether it was not yet.
    fn visit(&mut self, id: u32) -> bool {
        let mark = &mut self.marks[id as usize];
        let fresh = *mark != self.stamp;
        *mark = self.stamp;
        fresh
    }

    /// The results, nearest first (left in place, so a search can go on).
    fn sorted(&self) -> Vec<Near> {
        let mut found: Vec<Near> = self.results.iter().copied().collect();
        found.sort_unstable();
        found
    }
}

/// How far a lookup searches: a first pass keeping `first_ef` candidates, widened to `ef`
/// when the caller asks (when the first pass found something near enough to matter), and
/// at most `max_visits` distances in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Candidates the first pass keeps.
    pub first_ef: usize,
    /// Candidates a widened search keeps.
    pub ef: usize,
    /// Most distances a search computes (it stops there, with what it found).
    pub max_visits: usize,
}

impl Reach {
    /// One pass of `ef` candidates, unbounded.
    #[cfg(test)]
    pub fn exhaustive(ef: usize) -> Self {
        Self {
            first_ef: ef,
            ef,
            max_visits: usize::MAX,
        }
    }
}

/// What a search found, and what it cost.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The nodes found, nearest first.
    pub near: Vec<Near>,
    /// Distances computed (the search's cost, independent of the machine).
    pub visits: usize,
    /// Whether the first pass was widened.
    pub widened: bool,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// What [`Graph::plan`] found: a new node's level and its neighbours per layer (layer 0
/// first, nearest first).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    level: usize,
    layers: Vec<Vec<Near>>,
}

/// An HNSW graph of vectors of one dimension.
#[derive(Debug, Clone)]
pub struct Graph {
    dims: usize,
    /// Node `i`'s codes are `codes[i * dims..][..dims]`.
    codes: Vec<i8>,
    scales: Vec<f32>,
    levels: Vec<u8>,
    /// Node `i`'s layer-0 links are `links0[i * M0..][..count0[i]]`.
    links0: Vec<Link>,
    count0: Vec<u8>,
    /// Node `i`'s links on layer `l >= 1` are `upper[i][l - 1]`.
    upper: Vec<Vec<Vec<Link>>>,
    entry: Option<u32>,
    top: usize,
}

impl Graph {
    /// An empty graph of `dims`-dimensional vectors.
    pub fn new(dims: usize) -> Self {
        Self {
            dims,
            codes: Vec::new(),
            scales: Vec::new(),
            levels: Vec::new(),
            links0: Vec::new(),
            count0: Vec::new(),
            upper: Vec::new(),
            entry: None,
            top: 0,
        }
    }

    /// The vectors' dimension.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Nodes.
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    /// A level for a new node: `l` with probability `(1 - 1/M) M^-l`.
    pub fn random_level() -> usize {
        let u = 1.0 - fastrand::f64(); // (0, 1]
        let level = -u.ln() / (M as f64).ln();
        (level as usize).min(MAX_LEVEL)
    }

    fn code(&self, id: u32) -> &[i8] {
        let start = id as usize * self.dims;
        &self.codes[start..start + self.dims]
    }

    fn dist(&self, q: &Code, id: u32) -> f32 {
        let dot = dot_i8(&q.codes, self.code(id)) as f32;
        1.0 - dot * q.scale * self.scales[id as usize]
    }

    fn dist_between(&self, a: u32, b: u32) -> f32 {
        let dot = dot_i8(self.code(a), self.code(b)) as f32;
        1.0 - dot * self.scales[a as usize] * self.scales[b as usize]
    }

    fn links(&self, id: u32, layer: usize) -> &[Link] {
        let id = id as usize;
        if layer == 0 {
            &self.links0[id * M0..id * M0 + usize::from(self.count0[id])]
        } else {
            self.upper[id].get(layer - 1).map_or(&[], Vec::as_slice)
        }
    }

    /// The about `ef` nodes nearest to `q`, nearest first.
    #[cfg(test)]
    pub fn search(&self, q: &Code, ef: usize) -> Vec<Near> {
        self.search_reach(q, Reach::exhaustive(ef), |_| false).near
    }

    /// The nodes nearest to `q` within `reach`, nearest first: a first pass of
    /// `reach.first_ef` candidates, which goes on to `reach.ef` (from where it stopped, no
    /// distance computed twice) when `widen` says so of the first pass's results.
    pub fn search_reach(
        &self,
        q: &Code,
        reach: Reach,
        widen: impl FnOnce(&[Near]) -> bool,
    ) -> Found {
        let Some(entry) = self.entry else {
            return Found::default();
        };
        SCRATCH.with_borrow_mut(|s| {
            s.visits = 1;
            let mut ep = Near {
                dist: self.dist(q, entry),
                id: entry,
            };
            for layer in (1..=self.top).rev() {
                ep = self.greedy(q, ep, layer, s);
            }
            s.begin(self.len());
            self.seed(&[ep], s);
            let first = reach.first_ef.max(1);
            self.expand(q, first, 0, reach.max_visits, s);
            let mut near = s.sorted();
            let widened = reach.ef > first && s.visits < reach.max_visits && widen(&near);
            if widened {
                s.resume();
                self.expand(q, reach.ef, 0, reach.max_visits, s);
                near = s.sorted();
            }
            Found {
                near,
                visits: s.visits,
                widened,
            }
        })
    }

    /// The nearest node on `layer` reached from `ep` by always stepping closer.
    fn greedy(&self, q: &Code, mut ep: Near, layer: usize, s: &mut Scratch) -> Near {
        loop {
            let mut moved = false;
            for link in self.links(ep.id, layer) {
                let dist = self.dist(q, link.id);
                s.visits += 1;
                if dist < ep.dist {
                    ep = Near { dist, id: link.id };
                    moved = true;
                }
            }
            if !moved {
                return ep;
            }
        }
    }

    /// Reads one byte of each cache line of the codes of `ids` before their distances are
    /// computed: independent loads the CPU issues together (a dozen misses in flight),
    /// where the distance loop alone waits for one or two nodes' lines at a time. A
    /// software prefetch without `unsafe` intrinsics.
    fn touch(&self, ids: &[u32]) {
        let mut sum = 0u8;
        for &id in ids {
            let code = self.code(id);
            for byte in code.iter().step_by(64) {
                sum ^= *byte as u8;
            }
            if let Some(last) = code.last() {
                sum ^= *last as u8;
            }
        }
        std::hint::black_box(sum);
    }

    /// Starts a layer's search from `entries` (after [`Scratch::begin`]).
    fn seed(&self, entries: &[Near], s: &mut Scratch) {
        for &e in entries {
            if s.visit(e.id) {
                s.candidates.push(Reverse(e));
                s.results.push(e);
            }
        }
    }

    /// The paper's algorithm 2 on `layer`, from the candidates and results in `s`: keeps
    /// the `ef` nearest nodes found, until no candidate is nearer than the farthest of
    /// them, or `max_visits` distances were computed. The candidate it stopped at stays,
    /// and every other node it measured is deferred, so a search can go on with a larger
    /// `ef` as if it had had it from the start.
    fn expand(&self, q: &Code, ef: usize, layer: usize, max_visits: usize, s: &mut Scratch) {
        s.trim(ef);
        let mut fresh = [0u32; M0];
        while let Some(Reverse(c)) = s.candidates.pop() {
            let worst = s.results.peek().map_or(f32::INFINITY, |w| w.dist);
            if (s.results.len() >= ef && c.dist > worst) || s.visits >= max_visits {
                s.candidates.push(Reverse(c));
                return;
            }
            let mut n = 0;
            for link in self.links(c.id, layer) {
                if n < M0 && s.visit(link.id) {
                    fresh[n] = link.id;
                    n += 1;
                }
            }
            let fresh = &fresh[..n];
            self.touch(fresh);
            for &id in fresh {
                let dist = self.dist(q, id);
                s.visits += 1;
                let worst = s.results.peek().map_or(f32::INFINITY, |w| w.dist);
                let near = Near { dist, id };
                if s.results.len() < ef || dist < worst {
                    s.candidates.push(Reverse(near));
                    s.results.push(near);
                    s.trim(ef);
                } else {
                    s.deferred.push(near);
                }
            }
        }
    }

    /// The `ef` nearest nodes on `layer` found from `entries`, nearest first.
    fn search_layer(
        &self,
        q: &Code,
        entries: &[Near],
        ef: usize,
        layer: usize,
        s: &mut Scratch,
    ) -> Vec<Near> {
        s.begin(self.len());
        self.seed(entries, s);
        self.expand(q, ef, layer, usize::MAX, s);
        s.sorted()
    }

    /// The neighbours to link a node to: of `candidates` (nearest first), each one nearer
    /// to the node than to every one picked before it, up to `m` (the paper's algorithm 4).
    fn select(&self, candidates: &[Near], m: usize) -> Vec<Near> {
        let mut picked: Vec<Near> = Vec::with_capacity(m);
        for c in candidates {
            if picked.len() == m {
                break;
            }
            if picked
                .iter()
                .all(|p| self.dist_between(c.id, p.id) > c.dist)
            {
                picked.push(*c);
            }
        }
        picked
    }

    /// Finds the neighbours a new node of `level` for `q` links to; reads the graph only.
    pub fn plan(&self, q: &Code, level: usize) -> Plan {
        let mut plan = Plan {
            level,
            layers: Vec::new(),
        };
        let Some(entry) = self.entry else {
            return plan;
        };
        SCRATCH.with_borrow_mut(|s| {
            let mut ep = Near {
                dist: self.dist(q, entry),
                id: entry,
            };
            for layer in (level + 1..=self.top).rev() {
                ep = self.greedy(q, ep, layer, s);
            }
            let mut entries = vec![ep];
            let lowest = level.min(self.top);
            plan.layers = vec![Vec::new(); lowest + 1];
            for layer in (0..=lowest).rev() {
                let found = self.search_layer(q, &entries, EF_CONSTRUCTION, layer, s);
                plan.layers[layer] = self.select(&found, if layer == 0 { M0 } else { M });
                entries = found;
            }
        });
        plan
    }

    /// Adds a node for `q` linked as `plan` says (planned on this graph, maybe before
    /// other inserts); returns its id.
    pub fn insert(&mut self, q: &Code, plan: &Plan) -> u32 {
        let id = self.len() as u32;
        let level = plan.level;
        self.codes.extend_from_slice(&q.codes);
        self.scales.push(q.scale);
        self.levels.push(level as u8);
        self.links0.extend(std::iter::repeat_n(Link::default(), M0));
        self.count0.push(0);
        self.upper.push(vec![Vec::new(); level]);
        self.link(id, plan);
        if self.entry.is_none() || level > self.top {
            self.entry = Some(id);
            self.top = level;
        }
        id
    }

    /// Re-uses node `id` for `q`: its vector, and its links on the layers of `plan` it
    /// has. Links other nodes had to it stay (they only make the graph a little less
    /// tidy; results are always measured against the node's vector).
    pub fn replace(&mut self, id: u32, q: &Code, plan: &Plan) {
        let start = id as usize * self.dims;
        self.codes[start..start + self.dims].copy_from_slice(&q.codes);
        self.scales[id as usize] = q.scale;
        self.link(id, plan);
    }

    fn link(&mut self, id: u32, plan: &Plan) {
        let level = usize::from(self.levels[id as usize]);
        for (layer, neighbours) in plan.layers.iter().enumerate().take(level + 1) {
            let links: Vec<Link> = neighbours
                .iter()
                .filter(|n| n.id != id)
                .map(|n| Link {
                    id: n.id,
                    dist: n.dist,
                })
                .collect();
            for link in &links {
                self.add_link(
                    link.id,
                    layer,
                    Link {
                        id,
                        dist: link.dist,
                    },
                );
            }
            if layer == 0 {
                let start = id as usize * M0;
                let n = links.len().min(M0);
                self.links0[start..start + n].copy_from_slice(&links[..n]);
                self.count0[id as usize] = n as u8;
            } else if let Some(slot) = self.upper[id as usize].get_mut(layer - 1) {
                *slot = links;
            }
        }
    }

    /// Gives `from` a link on `layer`; a full node drops its farthest link for a nearer one.
    fn add_link(&mut self, from: u32, layer: usize, link: Link) {
        let from = from as usize;
        let links: &mut [Link] = if layer == 0 {
            let count = usize::from(self.count0[from]);
            if count < M0
                && !self.links0[from * M0..from * M0 + count]
                    .iter()
                    .any(|l| l.id == link.id)
            {
                self.links0[from * M0 + count] = link;
                self.count0[from] += 1;
                return;
            }
            &mut self.links0[from * M0..from * M0 + count]
        } else {
            let Some(links) = self.upper[from].get_mut(layer - 1) else {
                return;
            };
            if links.len() < M && !links.iter().any(|l| l.id == link.id) {
                links.push(link);
                return;
            }
            links
        };
        if let Some(same) = links.iter_mut().find(|l| l.id == link.id) {
            same.dist = link.dist;
            return;
        }
        if let Some(farthest) = links.iter_mut().max_by(|a, b| a.dist.total_cmp(&b.dist))
            && link.dist < farthest.dist
        {
            *farthest = link;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(rng: &mut fastrand::Rng, dims: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dims).map(|_| rng.f32() - 0.5).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    fn exact(vectors: &[Vec<f32>], q: &[f32]) -> usize {
        let sim = |v: &Vec<f32>| v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>();
        (0..vectors.len())
            .max_by(|&a, &b| sim(&vectors[a]).total_cmp(&sim(&vectors[b])))
            .unwrap()
    }

    /// A graph of `n` random unit vectors, inserted one by one.
    fn graph_of(rng: &mut fastrand::Rng, dims: usize, n: usize) -> (Graph, Vec<Vec<f32>>) {
        let mut graph = Graph::new(dims);
        let vectors: Vec<Vec<f32>> = (0..n).map(|_| unit(rng, dims)).collect();
        for v in &vectors {
            let code = Code::new(v);
            let plan = graph.plan(&code, Graph::random_level());
            graph.insert(&code, &plan);
        }
        (graph, vectors)
    }

    #[test]
    fn a_search_finds_what_an_exact_scan_finds() {
        let mut rng = fastrand::Rng::with_seed(3);
        let dims = 32;
        let (graph, vectors) = graph_of(&mut rng, dims, 2_000);
        assert_eq!(graph.len(), 2_000);
        // Every stored vector finds itself; random queries mostly find the exact nearest.
        for (n, v) in vectors.iter().enumerate().step_by(97) {
            assert_eq!(graph.search(&Code::new(v), 32)[0].id as usize, n);
        }
        let queries = 200;
        let hits = (0..queries)
            .filter(|_| {
                let q = unit(&mut rng, dims);
                let found = graph.search(&Code::new(&q), 64);
                // The exact nearest among the graph's best few (the index re-ranks them).
                found
                    .iter()
                    .take(8)
                    .any(|n| n.id as usize == exact(&vectors, &q))
            })
            .count();
        assert!(hits * 100 >= queries * 95, "recall {hits}/{queries}");
    }

    #[test]
    fn the_lane_wise_dot_product_is_the_plain_sum() {
        let mut rng = fastrand::Rng::with_seed(11);
        for len in (0..100).chain([384, 768, 1_536]) {
            let a: Vec<i8> = (0..len).map(|_| rng.i8(-127..=127)).collect();
            let b: Vec<i8> = (0..len).map(|_| rng.i8(-127..=127)).collect();
            let plain: i32 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| i32::from(x) * i32::from(y))
                .sum();
            assert_eq!(dot_i8(&a, &b), plain, "{len} components");
        }
        let most = vec![-127i8; 1_536];
        assert_eq!(dot_i8(&most, &most), 127 * 127 * 1_536);
    }

    #[test]
    fn a_first_pass_goes_on_only_when_asked_and_visits_stay_bounded() {
        let mut rng = fastrand::Rng::with_seed(7);
        let dims = 32;
        let (graph, vectors) = graph_of(&mut rng, dims, 2_000);
        let reach = Reach {
            first_ef: 8,
            ef: 64,
            max_visits: usize::MAX,
        };
        let full = Reach::exhaustive(64);
        let mut asked = 0;
        for v in vectors.iter().step_by(101) {
            let code = Code::new(v);
            let short = graph.search_reach(&code, reach, |_| false);
            assert!(!short.widened);
            assert!(short.near.len() <= 8);
            let widened = graph.search_reach(&code, reach, |first| {
                asked += 1;
                first.len() <= 8
            });
            assert!(widened.widened);
            assert!(widened.visits > short.visits, "{widened:?} {short:?}");
            assert!(widened.near.len() > 8);
            // Going on finds what one full pass finds: the stored vector itself first.
            let one = graph.search_reach(&code, full, |_| true);
            assert!(!one.widened, "one pass: nothing to widen to");
            assert_eq!(widened.near[0].id, one.near[0].id);
            assert!(widened.near[0].dist < 0.01);
            // A bound on distances: it stops within one node's links past it.
            let bounded = graph.search_reach(
                &code,
                Reach {
                    max_visits: 100,
                    ..full
                },
                |_| false,
            );
            assert!(bounded.visits < 100 + M0, "{}", bounded.visits);
            assert!(bounded.visits < one.visits);
        }
        assert_eq!(asked, 20);
        assert!(
            Graph::new(4)
                .search_reach(&Code::new(&[1.0; 4]), full, |_| true)
                .near
                .is_empty()
        );
    }

    #[test]
    fn a_replaced_node_is_found_by_its_new_vector() {
        let mut rng = fastrand::Rng::with_seed(5);
        let dims = 16;
        let (mut graph, _) = graph_of(&mut rng, dims, 500);
        for id in [0u32, 17, 250, 499] {
            let v = unit(&mut rng, dims);
            let code = Code::new(&v);
            let plan = graph.plan(&code, Graph::random_level());
            graph.replace(id, &code, &plan);
            let found = graph.search(&code, 32);
            assert_eq!(found[0].id, id);
            assert!(found[0].dist < 0.01, "{:?}", found[0]);
        }
        assert_eq!(graph.len(), 500);
    }
}
