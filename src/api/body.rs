//! Request bodies under the server's limits, for every route: a client that
//! sends its body slowly is cut off (a timeout between reads, and a minimum
//! average rate once the first timeout has passed, like nginx's
//! `client_body_timeout` and Apache's `MinRate`, measured over each
//! `read_timeout` window so a fast start buys no slow finish); a body is
//! held in one contiguous buffer no larger than the body limit (not as a
//! list of tiny chunks, each pinning a read buffer); and the bytes of bodies
//! held at once are bounded, across all connections (`--max-body-memory`)
//! and per peer (a quarter of it for one IPv4 address or IPv6 /64), taken as
//! the bytes arrive, never on a declared length's word; beyond either the
//! answer is 503 with `Retry-After`. Requests with the admin token are not
//! counted: an operator can always abort a rollout.
//!
//! [`Pace`] is the pure rule; [`Paced`] applies it to hyper's body as it
//! streams (artifact uploads stream through it to their handler); [`read`]
//! collects a whole body under the budget.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;

/// How fast and how much a client must send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BodyRules {
    /// Longest wait for the next piece of a body.
    pub read_timeout: Duration,
    /// Slowest rate (bytes/s) accepted, averaged over each `read_timeout`
    /// window of the body; 0 turns the check off.
    pub min_rate: u64,
}

impl Default for BodyRules {
    fn default() -> Self {
        BodyRules {
            read_timeout: Duration::from_secs(10),
            min_rate: 500,
        }
    }
}

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    #[error(
        "the request body stalled: nothing arrived for {0:?} (--body-read-timeout); send the body without pauses"
    )]
    Stalled(Duration),
    #[error(
        "the request body arrived too slowly: {received} bytes in the last {elapsed:?}, below the minimum of {min_rate} bytes/s (--body-min-rate)"
    )]
    TooSlow {
        received: u64,
        elapsed: Duration,
        min_rate: u64,
    },
    #[error(
        "the request body is larger than the limit of {limit} bytes (ferry serve --max-body-bytes)"
    )]
    TooLarge { limit: usize },
    #[error(
        "the server already holds {budget} bytes of request bodies (--max-body-memory){whose}; retry shortly"
    )]
    Busy { budget: usize, whose: &'static str },
    #[error("the request body could not be read: {0}")]
    Read(String),
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        let status = match e {
            BodyError::Stalled(_) | BodyError::TooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        };
        let mut err = ApiError::new(status, e.to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.retry_after = Some(1);
        }
        err
    }
}

/// The pacing rule, a pure function of what arrived and when: over each
/// window of `read_timeout`, the body must average `min_rate`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    rules: BodyRules,
    window_started: Instant,
    window_bytes: u64,
}

impl Pace {
    pub fn new(rules: BodyRules, started: Instant) -> Pace {
        Pace {
            rules,
            window_started: started,
            window_bytes: 0,
        }
    }

    /// `n` more bytes arrived at `now`: is the body still fast enough?
    pub fn arrived(&mut self, n: usize, now: Instant) -> Result<(), BodyError> {
        self.window_bytes += n as u64;
        let elapsed = now.saturating_duration_since(self.window_started);
        if self.rules.min_rate == 0 || elapsed <= self.rules.read_timeout {
            return Ok(());
        }
        let rate = self.window_bytes as f64 / elapsed.as_secs_f64();
        if rate < self.rules.min_rate as f64 {
            return Err(BodyError::TooSlow {
                received: self.window_bytes,
                elapsed,
                min_rate: self.rules.min_rate,
            });
        }
        (self.window_started, self.window_bytes) = (now, 0);
        Ok(())
    }
}

/// hyper's body with the pacing rule applied as it streams. The timer is
/// armed only when the client makes us wait, so a body that arrives with
/// its headers costs no timer.
pub struct Paced<B> {
    inner: B,
    pace: Pace,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    failed: bool,
}

impl<B> Paced<B> {
    pub fn new(inner: B, rules: BodyRules) -> Paced<B> {
        Paced {
            inner,
            pace: Pace::new(rules, Instant::now()),
            stall: None,
            failed: false,
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        let fail = |this: &mut Self, e: BodyError| {
            this.failed = true;
            Poll::Ready(Some(Err(e)))
        };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stall = None;
                let n = frame.data_ref().map_or(0, Bytes::len);
                match this.pace.arrived(n, Instant::now()) {
                    Ok(()) => Poll::Ready(Some(Ok(frame))),
                    Err(e) => fail(this, e),
                }
            }
            Poll::Ready(Some(Err(e))) => fail(this, BodyError::Read(e.to_string())),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.pace.rules.read_timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => fail(this, BodyError::Stalled(timeout)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The bytes of request bodies held in memory at once: in all, and per
/// peer (a quarter of the whole for one address; IPv6 by /64).
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    by_peer: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
}

/// Bytes of the budget one body holds; given back when dropped.
#[derive(Default)]
struct Share {
    permit: Option<OwnedSemaphorePermit>,
    peer: Option<(IpAddr, BodyBudget)>,
    bytes: usize,
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some((peer, budget)) = &self.peer {
            let mut held = budget.by_peer.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = held.get_mut(peer) {
                *n = n.saturating_sub(self.bytes);
                if *n == 0 {
                    held.remove(peer);
                }
            }
        }
    }
}

impl BodyBudget {
    pub fn new(total: usize) -> BodyBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            by_peer: Default::default(),
        }
    }

    /// The most one peer may hold.
    fn per_peer(&self) -> usize {
        (self.total / 4).max(1)
    }

    /// Takes `n` more bytes of the budget for one body (from `peer`), or
    /// says it is spent.
    fn take(&self, share: &mut Share, peer: Option<IpAddr>, n: usize) -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        let busy = |whose| BodyError::Busy {
            budget: self.total,
            whose,
        };
        if let Some(peer) = peer {
            let mut held = self.by_peer.lock().unwrap_or_else(|p| p.into_inner());
            let mine = held.entry(peer).or_default();
            if *mine + n > self.per_peer() {
                return Err(busy(", a quarter of it for one client address"));
            }
            *mine += n;
            share.peer.get_or_insert_with(|| (peer, self.clone()));
            share.bytes += n;
        }
        let more = u32::try_from(n)
            .ok()
            .and_then(|n| self.bytes.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| busy(""))?;
        match &mut share.permit {
            Some(permit) => permit.merge(more),
            None => share.permit = Some(more),
        }
        Ok(())
    }

    /// Bytes not taken by a body now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// The budget a body is read under: the server's, as one peer's share, or
/// none (a request with the admin token).
pub struct Account<'a> {
    pub budget: Option<&'a BodyBudget>,
    pub peer: Option<IpAddr>,
}

/// The address a peer's share is kept under: IPv4 as it is, IPv6 by its
/// /64 (one host usually holds a whole /64).
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// A whole request body, and its share of the budget (returned when this
/// is dropped).
pub struct Held {
    pub bytes: Bytes,
    _budget: Share,
}

/// Reads a whole body into one buffer of at most `limit` bytes, taking its
/// size from the budget as it arrives (in steps of 64 KiB, or the declared
/// length when smaller); a declared length over the limit is refused before
/// anything is read.
pub async fn read<B>(
    body: B,
    declared: Option<u64>,
    limit: usize,
    account: Account<'_>,
) -> Result<Held, BodyError>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    const STEP: usize = 64 << 10;
    let cap = match declared {
        Some(n) if n > limit as u64 => return Err(BodyError::TooLarge { limit }),
        Some(n) => n as usize,
        None => limit,
    };
    let mut share = Share::default();
    let mut reserved = 0;
    let mut body = body;
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        if data.is_empty() {
            continue;
        }
        let len = first.as_ref().map_or(0, Bytes::len) + buf.len() + data.len();
        if len > limit {
            return Err(BodyError::TooLarge { limit });
        }
        if len > reserved {
            let step = (len - reserved).max(STEP.min(cap.saturating_sub(reserved)));
            if let Some(budget) = account.budget {
                budget.take(&mut share, account.peer, step)?;
            }
            reserved += step;
        }
        // The common case, a body in one piece, is kept as it arrived; a
        // second piece moves everything into one buffer of its own, so that
        // no piece keeps the read buffer it was cut from alive.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            None => buf.extend_from_slice(&data),
            Some(one) => {
                buf.reserve(reserved.max(len));
                buf.extend_from_slice(&one);
                buf.extend_from_slice(&data);
            }
        }
    }
    let bytes = first.unwrap_or_else(|| buf.freeze());
    Ok(Held {
        bytes,
        _budget: share,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_rate_is_checked_over_each_window() {
        let rules = BodyRules {
            read_timeout: ms(1000),
            min_rate: 100,
        };
        let t0 = Instant::now();
        let mut pace = Pace::new(rules, t0);
        // One byte at a time, slowly: fine within the first second...
        assert!(pace.arrived(1, t0 + ms(500)).is_ok());
        assert!(pace.arrived(1, t0 + ms(1000)).is_ok());
        // ...then 3 bytes in 1.5 s is below 100 bytes/s.
        assert_eq!(
            pace.arrived(1, t0 + ms(1500)),
            Err(BodyError::TooSlow {
                received: 3,
                elapsed: ms(1500),
                min_rate: 100
            })
        );
        // A fast body is never cut, however long it takes.
        let mut pace = Pace::new(rules, t0);
        for s in 1..=60 {
            assert!(pace.arrived(1000, t0 + Duration::from_secs(s)).is_ok());
        }
        // A fast start buys no slow finish: the next window is judged alone.
        assert!(
            pace.arrived(1, t0 + ms(60_500)).is_ok(),
            "within the window"
        );
        assert!(matches!(
            pace.arrived(1, t0 + ms(61_100)),
            Err(BodyError::TooSlow { received: 2, .. })
        ));
        // 0 turns the rate check off.
        let mut pace = Pace::new(
            BodyRules {
                min_rate: 0,
                ..rules
            },
            t0,
        );
        assert!(pace.arrived(1, t0 + Duration::from_secs(600)).is_ok());
    }

    /// A body of the given pieces, each arriving at once; with `open` it
    /// then waits forever, like a client that stopped sending.
    struct Pieces {
        parts: std::collections::VecDeque<Bytes>,
        open: bool,
    }

    impl Body for Pieces {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.parts.pop_front() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None if self.open => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn pieces(parts: Vec<&'static [u8]>) -> Paced<Pieces> {
        let parts = parts.into_iter().map(Bytes::from_static).collect();
        Paced::new(Pieces { parts, open: false }, BodyRules::default())
    }

    fn all(budget: &BodyBudget) -> Account<'_> {
        Account {
            budget: Some(budget),
            peer: None,
        }
    }

    #[tokio::test]
    async fn one_peer_may_hold_a_quarter_and_the_admin_none_of_the_budget() {
        // 4000 in all, 1000 for one peer; each body takes its limit (500)
        // as its first piece arrives.
        let budget = BodyBudget::new(4000);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let from = |peer| Account {
            budget: Some(&budget),
            peer: Some(peer),
        };
        let body = || pieces(vec![&[b' '; 60][..], &[b' '; 60][..]]);
        let first = read(body(), None, 500, from(a)).await.unwrap();
        let second = read(body(), None, 500, from(a)).await.unwrap();
        assert!(matches!(
            read(body(), None, 500, from(a)).await.err(),
            Some(BodyError::Busy { whose, .. }) if whose.contains("one client address")
        ));
        let other = read(body(), None, 500, from(b)).await.unwrap();
        let admin = Account {
            budget: None,
            peer: Some(a),
        };
        assert!(read(body(), None, 500, admin).await.is_ok(), "not counted");
        assert_eq!(budget.available(), 2500);
        drop((first, second, other));
        assert_eq!(budget.available(), 4000);
        assert!(read(body(), None, 500, from(a)).await.is_ok(), "given back");
        // IPv6 peers are kept by /64.
        assert_eq!(
            peer_key("2001:db8::1".parse().unwrap()),
            peer_key("2001:db8::ffff:2".parse().unwrap())
        );
        assert_ne!(
            peer_key("2001:db8:0:1::1".parse().unwrap()),
            peer_key("2001:db8::1".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn pieces_are_joined_into_one_buffer_within_the_budget() {
        let budget = BodyBudget::new(1000);
        let held = read(pieces(vec![b"ab", b"c", b"de"]), None, 100, all(&budget))
            .await
            .unwrap();
        assert_eq!(&held.bytes[..], b"abcde");
        assert!(budget.available() < 1000, "the body holds its share");
        drop(held);
        assert_eq!(budget.available(), 1000, "and gives it back");
        // One piece is kept as it is.
        let one = read(pieces(vec![b"xyz"]), Some(3), 100, all(&budget))
            .await
            .unwrap();
        assert_eq!((&one.bytes[..], budget.available()), (&b"xyz"[..], 997));
    }

    #[tokio::test]
    async fn too_large_or_over_budget_bodies_are_refused() {
        let budget = BodyBudget::new(10);
        assert_eq!(
            read(pieces(vec![b"abcdef"]), Some(6), 5, all(&budget))
                .await
                .err(),
            Some(BodyError::TooLarge { limit: 5 })
        );
        assert_eq!(
            read(pieces(vec![b"abc", b"def"]), None, 5, all(&budget))
                .await
                .err(),
            Some(BodyError::TooLarge { limit: 5 })
        );
        let _a = read(pieces(vec![b"12345678"]), Some(8), 100, all(&budget))
            .await
            .unwrap();
        assert_eq!(
            read(pieces(vec![b"123"]), Some(3), 100, all(&budget))
                .await
                .err(),
            Some(BodyError::Busy {
                budget: 10,
                whose: ""
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_cut_after_the_read_timeout() {
        let body = Pieces {
            parts: [Bytes::from_static(b"a")].into(),
            open: true,
        };
        let rules = BodyRules {
            read_timeout: ms(200),
            min_rate: 0,
        };
        let budget = BodyBudget::new(100);
        let err = read(Paced::new(body, rules), None, 100, all(&budget))
            .await
            .err();
        assert_eq!(err, Some(BodyError::Stalled(ms(200))));
        assert_eq!(
            budget.available(),
            100,
            "a refused body gives its share back"
        );
    }
}
