//! Request bodies under the server's limits, for every route: a client that
//! sends its body slowly is cut off (a timeout between reads, and a minimum
//! average rate once the first timeout has passed, like nginx's
//! `client_body_timeout` and Apache's `MinRate`); a body is held in one
//! contiguous buffer no larger than the body limit (not as a list of tiny
//! chunks, each pinning a read buffer); and the bytes of bodies held at once
//! across all connections are bounded (`--max-body-memory`: beyond it the
//! answer is 503 with `Retry-After`).
//!
//! [`Pace`] is the pure rule; [`Paced`] applies it to hyper's body as it
//! streams (artifact uploads stream through it to their handler); [`read`]
//! collects a whole body under the budget.

use std::future::Future;
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
    /// Slowest average rate (bytes/s) accepted once `read_timeout` has
    /// passed since the body started; 0 turns the check off.
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
        "the request body arrived too slowly: {received} bytes in {elapsed:?}, below the minimum of {min_rate} bytes/s (--body-min-rate)"
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
        "the server already holds {budget} bytes of request bodies (--max-body-memory); retry shortly"
    )]
    Busy { budget: usize },
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

/// The pacing rule, a pure function of what arrived and when.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    rules: BodyRules,
    started: Instant,
    received: u64,
}

impl Pace {
    pub fn new(rules: BodyRules, started: Instant) -> Pace {
        Pace {
            rules,
            started,
            received: 0,
        }
    }

    /// `n` more bytes arrived at `now`: is the body still fast enough?
    pub fn arrived(&mut self, n: usize, now: Instant) -> Result<(), BodyError> {
        self.received += n as u64;
        let elapsed = now.saturating_duration_since(self.started);
        if self.rules.min_rate == 0 || elapsed <= self.rules.read_timeout {
            return Ok(());
        }
        let rate = self.received as f64 / elapsed.as_secs_f64();
        if rate < self.rules.min_rate as f64 {
            return Err(BodyError::TooSlow {
                received: self.received,
                elapsed,
                min_rate: self.rules.min_rate,
            });
        }
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

/// The bytes of request bodies held in memory at once, across connections.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    pub fn new(total: usize) -> BodyBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Takes `n` more bytes of the budget for one body, or says it is spent.
    fn take(&self, held: &mut Option<OwnedSemaphorePermit>, n: usize) -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        let busy = BodyError::Busy { budget: self.total };
        let n = u32::try_from(n).map_err(|_| busy.clone())?;
        let more = self
            .bytes
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| busy)?;
        match held {
            Some(permit) => permit.merge(more),
            None => *held = Some(more),
        }
        Ok(())
    }

    /// Bytes not taken by a body now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// A whole request body, and its share of the budget (returned when this
/// is dropped).
pub struct Held {
    pub bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Reads a whole body into one buffer of at most `limit` bytes, taking its
/// size from the budget first (the declared length at once; a chunked body
/// as it grows, in steps of 64 KiB).
pub async fn read<B>(
    body: B,
    declared: Option<u64>,
    limit: usize,
    budget: &BodyBudget,
) -> Result<Held, BodyError>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    const STEP: usize = 64 << 10;
    let mut held = None;
    if let Some(n) = declared {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > limit {
            return Err(BodyError::TooLarge { limit });
        }
        budget.take(&mut held, n)?;
    }
    let mut reserved = declared.map_or(0, |n| n as usize);
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
            let step = (len - reserved).max(STEP).min(limit - reserved);
            budget.take(&mut held, step)?;
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
        _budget: held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_rate_is_checked_only_after_the_first_timeout() {
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

    #[tokio::test]
    async fn pieces_are_joined_into_one_buffer_within_the_budget() {
        let budget = BodyBudget::new(1000);
        let held = read(pieces(vec![b"ab", b"c", b"de"]), None, 100, &budget)
            .await
            .unwrap();
        assert_eq!(&held.bytes[..], b"abcde");
        assert!(budget.available() < 1000, "the body holds its share");
        drop(held);
        assert_eq!(budget.available(), 1000, "and gives it back");
        // One piece is kept as it is.
        let one = read(pieces(vec![b"xyz"]), Some(3), 100, &budget)
            .await
            .unwrap();
        assert_eq!((&one.bytes[..], budget.available()), (&b"xyz"[..], 997));
    }

    #[tokio::test]
    async fn too_large_or_over_budget_bodies_are_refused() {
        let budget = BodyBudget::new(10);
        assert_eq!(
            read(pieces(vec![b"abcdef"]), Some(6), 5, &budget)
                .await
                .err(),
            Some(BodyError::TooLarge { limit: 5 })
        );
        assert_eq!(
            read(pieces(vec![b"abc", b"def"]), None, 5, &budget)
                .await
                .err(),
            Some(BodyError::TooLarge { limit: 5 })
        );
        let _a = read(pieces(vec![b"12345678"]), Some(8), 100, &budget)
            .await
            .unwrap();
        assert_eq!(
            read(pieces(vec![b"123"]), Some(3), 100, &budget)
                .await
                .err(),
            Some(BodyError::Busy { budget: 10 })
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
        let err = read(Paced::new(body, rules), None, 100, &budget)
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
