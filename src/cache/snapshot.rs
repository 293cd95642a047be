//! The read side of the cache: the current token as published for the warm path, and the clock
//! kept off that path.
//!
//! Every change of the cache's current token (installed by a refresh, dropped by a 401 or
//! [`TokenCache::invalidate`](super::TokenCache::invalidate)) goes through
//! `TokenCache::publish`, which stores it here. Readers never lock:
//!
//! - `word` is one atomic word, on its own cache line, holding the published generation and
//!   its **phase** (fresh, refresh-ahead due, stale, or "read the clock"). Every request loads
//!   it; only a publish and the phase timer write it, a few times per token lifetime, so it
//!   stays shared-clean in every core's cache;
//! - `token` is an `ArcSwapOption`: a service that holds no copy yet (a clone made from a
//!   service that was never called, as in `api.clone().oneshot(request)`) takes the header from
//!   it with a lock-free load, whatever its usage pattern.
//!
//! # The clock off the hot path
//!
//! Reading `tokio::time::Instant::now()` costs about 21 ns on the machine of BENCHMARKS.md, a
//! third of a whole static-header call. Instead:
//!
//! - **Phase timers per token generation.** Each publish of a token registers two Tokio timers
//!   on the runtime that fetched it, at the refresh-ahead point ("refresh-ahead due") and at the
//!   refresh point ("stale"): two wake-ups per token lifetime, nothing when idle, no task. They
//!   are `Sleep`s polled once with a waker that sets the phase itself, so the phase changes
//!   inside the timer driver's processing, before any task or `block_on` future is polled
//!   again. They follow Tokio's clock, so `tokio::time::pause()` and `advance()` move them like
//!   any timer (and, like any pending timer, they are where a paused runtime's auto-advance may
//!   jump to when it is idle). A stale phase sends requests to the slow path, which reads the
//!   clock and decides as before.
//! - **A coarse clock as backstop** (`CLOCK_MONOTONIC_COARSE` on Linux through `coarsetime`,
//!   about 3 ns): each token also carries its two deadlines on that clock, checked on every warm
//!   request. A timer only fires while its runtime is driven; a current-thread runtime entered
//!   from time to time with `block_on` would otherwise see a "fresh" phase long after the
//!   refresh point. Under `tokio::time::pause()` real time barely moves, so the backstop stays
//!   silent there and the timer alone follows the paused clock.
//! - If no timer can run (no runtime at publish time, or its runtime shut down: the driver
//!   wakes its timers then, before their deadlines), the phase says "read the clock" and the
//!   warm path reads Tokio's clock as it did before.
//!
//! **Bound on serving past the refresh point:** at most one tick of the coarse clock (Linux: one
//! jiffy, 1-10 ms; macOS: about 1 ms; Windows: about 16 ms); under a paused Tokio clock, none
//! (the phase changes while the driver processes the timers, before `advance()` returns to its
//! caller), give or take Tokio's 1 ms timer resolution. The refresh point precedes expiry by the
//! refresh margin (at least 10 % of the lifetime, 100 ms for a 1 s token), so a token is never
//! served past its expiry on the warm path.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

use arc_swap::{ArcSwapOption, Guard};
use tokio::time::{Instant, Sleep};

use super::LocalToken;

/// The generation number meaning "no usable token".
pub(crate) const NO_TOKEN: u64 = 0;

/// Phase of the published token: before its refresh-ahead point; no clock needed.
pub(crate) const FRESH: u64 = 0;
/// Between the refresh-ahead and refresh points: served, and a background refresh is due.
pub(crate) const AHEAD: u64 = 1;
/// At or past its refresh point (or no token): the slow path decides.
pub(crate) const STALE: u64 = 2;
/// No phase timer runs for it: the warm path reads Tokio's clock.
pub(crate) const CLOCK: u64 = 3;
const PHASE_BITS: u32 = 2;
const PHASE_MASK: u64 = (1 << PHASE_BITS) - 1;

/// A generation and phase packed into one word.
#[inline]
pub(crate) fn generation_of(word: u64) -> u64 {
    word >> PHASE_BITS
}

/// The phase of a packed word.
#[inline]
pub(crate) fn phase_of(word: u64) -> u64 {
    word & PHASE_MASK
}

fn pack(generation: u64, phase: u64) -> u64 {
    (generation << PHASE_BITS) | phase
}

/// The phase of a token with these deadlines at `now`.
fn phase_at(now: Instant, token: &LocalToken) -> u64 {
    if now >= token.refresh_at {
        STALE
    } else if now >= token.refresh_ahead_at {
        AHEAD
    } else {
        FRESH
    }
}

/// Now on the coarse clock, in `coarsetime` ticks (2^-32 s). Never written anywhere: unlike
/// `coarsetime::Instant::now`, this does not update the crate's shared "recent" cache line.
#[inline]
pub(crate) fn coarse_now() -> u64 {
    coarsetime::Instant::now_without_cache_update().as_ticks()
}

/// `at` (on Tokio's clock) on the coarse clock, in ticks: now on the coarse clock plus the time
/// left until `at`. Under a paused Tokio clock, the time left is virtual and lies ahead in real
/// time, so the backstop never fires before the timer does.
pub(crate) fn coarse_deadline(at: Instant) -> u64 {
    let left = at.saturating_duration_since(Instant::now());
    coarse_now().saturating_add(coarsetime::Duration::from(left).as_ticks())
}

/// Keeps the word read on every request on its own cache line, away from the `Arc` reference
/// counts and the mutex that other cores write.
#[repr(align(128))]
struct CacheLine<T>(T);

type Word = Arc<CacheLine<AtomicU64>>;

/// The two timers of the published token (refresh-ahead and refresh points). Not tasks: each
/// is a Tokio `Sleep` polled once with a [`PhaseWaker`], so the phase changes inside the timer
/// driver's own processing, before any task or `block_on` future runs again.
type Timers = [Pin<Box<Sleep>>; 2];

/// The published current token.
pub(crate) struct Published {
    /// Generation (or [`NO_TOKEN`]) and phase of the published token.
    word: Word,
    token: ArcSwapOption<LocalToken>,
    /// The phase timers of the published generation; dropping them deregisters them.
    timers: Mutex<Option<Timers>>,
}

impl Published {
    pub(crate) fn new() -> Self {
        Self {
            word: Arc::new(CacheLine(AtomicU64::new(pack(NO_TOKEN, STALE)))),
            token: ArcSwapOption::const_empty(),
            timers: Mutex::new(None),
        }
    }

    /// The packed generation and phase: one atomic load.
    #[inline]
    pub(crate) fn word(&self) -> u64 {
        self.word.0.load(Ordering::Acquire)
    }

    /// The generation of the published token, [`NO_TOKEN`] when there is none.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        generation_of(self.word())
    }

    /// The published token, lock-free (no allocation once the thread has read it before).
    #[inline]
    pub(crate) fn load(&self) -> Guard<Option<Arc<LocalToken>>> {
        self.token.load()
    }

    /// Replaces the published token and arms its phase timers. Called only by
    /// `TokenCache::publish`, under the state lock, so publications never interleave; in the
    /// refresh task (a runtime with a time driver) when it installs a token.
    pub(crate) fn store(&self, token: Option<&LocalToken>) {
        let mut timers = self.timers.lock().unwrap_or_else(PoisonError::into_inner);
        // The previous generation's timers, deregistered.
        *timers = None;
        let Some(token) = token else {
            self.token.store(None);
            self.word.0.store(pack(NO_TOKEN, STALE), Ordering::Release);
            return;
        };
        self.token.store(Some(Arc::new(token.clone())));
        let generation = token.generation;
        if tokio::runtime::Handle::try_current().is_err() {
            self.word
                .0
                .store(pack(generation, CLOCK), Ordering::Release);
            return;
        }
        let phase = phase_at(Instant::now(), token);
        self.word
            .0
            .store(pack(generation, phase), Ordering::Release);
        if phase != STALE {
            *timers = Some([
                self.arm(generation, AHEAD, token.refresh_ahead_at),
                self.arm(generation, STALE, token.refresh_at),
            ]);
        }
    }

    /// A timer that sets `phase` for `generation` at `deadline`.
    fn arm(&self, generation: u64, phase: u64, deadline: Instant) -> Pin<Box<Sleep>> {
        let mut sleep = Box::pin(tokio::time::sleep_until(deadline));
        let waker = Waker::from(Arc::new(PhaseWaker {
            word: Arc::clone(&self.word),
            generation,
            phase,
            deadline,
        }));
        // Registers it with the timer driver; if the deadline has passed, the phase computed
        // by the caller already says so.
        let _ = sleep.as_mut().poll(&mut Context::from_waker(&waker));
        sleep
    }
}

/// Sets the phase of `generation` if it is still the published one. Phases only move forward
/// (fresh, refresh-ahead due, stale); "read the clock" replaces any but stale.
fn advance_phase(word: &Word, generation: u64, phase: u64) {
    let _ = word
        .0
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (generation_of(current) == generation
                && phase_of(current) != STALE
                && phase > phase_of(current))
            .then_some(pack(generation, phase))
        });
}

/// Woken by the timer driver when a phase timer fires, or when its runtime shuts down (then
/// before the deadline: the warm path falls back to reading the clock for that token).
struct PhaseWaker {
    word: Word,
    generation: u64,
    phase: u64,
    deadline: Instant,
}

impl Wake for PhaseWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let phase = if Instant::now() >= self.deadline {
            self.phase
        } else {
            CLOCK
        };
        advance_phase(&self.word, self.generation, phase);
    }
}
