//! Upstream connections for many calls in flight: lanes of HTTP clients, each with its own
//! connection pool.
//!
//! Over HTTP/2 (negotiated through TLS with every provider that speaks it, or h2c with
//! `http2_prior_knowledge`) a pool keeps one connection per host, and the server caps the
//! streams one connection carries (`SETTINGS_MAX_CONCURRENT_STREAMS`, 100 to 256 at common
//! front ends). Past the cap hyper does not open a second connection: the request waits,
//! unseen, for a stream of that one connection to end, which for LLM streams means seconds.
//! So a call takes the first lane with fewer than `streams_per_connection` calls in flight
//! (100 by default, the least RFC 9113 asks a server to allow), and N calls in flight over
//! HTTP/2 use about N / 100 connections. Over HTTP/1.1 every call in flight holds a
//! connection of its own whatever the lane; the first lane serves up to 100 of them, as
//! before.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use super::HttpSettings;

/// The most lanes of one [`Upstream`]; past them calls share the least busy lane.
const MAX_LANES: usize = 256;

/// The clients of a group of providers (one pooled client per lane), cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    settings: HttpSettings,
    h2c: bool,
    /// The first lane's client.
    primary: reqwest::Client,
    lanes: Box<[OnceLock<Lane>]>,
}

struct Lane {
    client: reqwest::Client,
    in_flight: AtomicUsize,
}

/// A call's place in a lane, held until its response body is read or dropped.
pub struct LaneGuard {
    client: reqwest::Client,
    inner: Arc<Inner>,
    index: usize,
}

impl Upstream {
    /// Clients with `settings`; with `h2c`, HTTP/2 without negotiation (for `http://`
    /// providers with `http2_prior_knowledge`). Builds the first lane now, so a client that
    /// cannot be built fails at start.
    pub fn new(settings: &HttpSettings, h2c: bool) -> Result<Self, reqwest::Error> {
        let lanes: Box<[OnceLock<Lane>]> = (0..MAX_LANES).map(|_| OnceLock::new()).collect();
        let primary = build(settings, h2c)?;
        let _ = lanes[0].set(Lane::new(primary.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                h2c,
                primary,
                lanes,
            }),
        })
    }

    /// The first lane's client, for requests outside calls (token exchanges).
    pub fn primary(&self) -> reqwest::Client {
        self.inner.primary.clone()
    }

    /// A place in the first lane with room, opening lanes as they fill; when all are full,
    /// the least busy one.
    pub fn lane(&self) -> LaneGuard {
        let inner = &self.inner;
        let room = inner.settings.streams_per_connection.max(1);
        let mut least: Option<(usize, usize)> = None;
        for index in 0..MAX_LANES {
            let Some(lane) = inner.lane(index) else {
                break;
            };
            let before = lane.in_flight.fetch_add(1, Ordering::Relaxed);
            if before < room {
                return self.guard(index, &lane.client);
            }
            lane.in_flight.fetch_sub(1, Ordering::Relaxed);
            if least.is_none_or(|(_, n)| before < n) {
                least = Some((index, before));
            }
        }
        let index = least.map_or(0, |(i, _)| i);
        match inner.lane(index) {
            Some(lane) => {
                lane.in_flight.fetch_add(1, Ordering::Relaxed);
                self.guard(index, &lane.client)
            }
            // Only when the first lane is gone, which never happens: count nothing.
            None => LaneGuard {
                client: inner.primary.clone(),
                inner: self.inner.clone(),
                index: usize::MAX,
            },
        }
    }

    fn guard(&self, index: usize, client: &reqwest::Client) -> LaneGuard {
        LaneGuard {
            client: client.clone(),
            inner: self.inner.clone(),
            index,
        }
    }

    /// Lanes open now (for tests and metrics).
    pub fn lanes_open(&self) -> usize {
        self.inner
            .lanes
            .iter()
            .take_while(|l| l.get().is_some())
            .count()
    }
}

impl Inner {
    /// Lane `index`, building it when the one before it exists; `None` past the end or when
    /// a client cannot be built (then calls stay on the lanes there are).
    fn lane(&self, index: usize) -> Option<&Lane> {
        let slot = self.lanes.get(index)?;
        if let Some(lane) = slot.get() {
            return Some(lane);
        }
        match build(&self.settings, self.h2c) {
            Ok(client) => Some(slot.get_or_init(|| Lane::new(client))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build another upstream client; calls share the open ones");
                None
            }
        }
    }
}

impl Lane {
    fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl LaneGuard {
    /// The lane's client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        if let Some(lane) = self.inner.lanes.get(self.index).and_then(OnceLock::get) {
            lane.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("h2c", &self.inner.h2c)
            .field("lanes_open", &self.lanes_open())
            .finish()
    }
}

fn build(settings: &HttpSettings, h2c: bool) -> Result<reqwest::Client, reqwest::Error> {
    match h2c {
        true => super::h2c_client(settings),
        false => super::http_client(settings),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(room: usize) -> Upstream {
        let settings = HttpSettings {
            streams_per_connection: room,
            ..HttpSettings::default()
        };
        Upstream::new(&settings, false).unwrap()
    }

    #[test]
    fn calls_fill_a_lane_before_opening_the_next() {
        let up = upstream(2);
        let a = up.lane();
        let b = up.lane();
        assert_eq!((a.index, b.index, up.lanes_open()), (0, 0, 1));
        let c = up.lane();
        assert_eq!((c.index, up.lanes_open()), (1, 2));
        drop(a);
        // The freed place in the first lane is taken first.
        let d = up.lane();
        assert_eq!(d.index, 0);
        drop((b, c, d));
        assert_eq!(up.lane().index, 0);
    }

    #[test]
    fn past_the_last_lane_calls_share_the_least_busy() {
        let up = upstream(1);
        let held: Vec<LaneGuard> = (0..MAX_LANES).map(|_| up.lane()).collect();
        assert_eq!(up.lanes_open(), MAX_LANES);
        let extra = up.lane();
        assert!(extra.index < MAX_LANES);
        let after = up.lane();
        assert_ne!(extra.index, after.index, "spread over the full lanes");
        drop(held);
    }
}
