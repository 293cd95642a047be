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
//! third of a whole static-header call; even the coarse clock (`CLOCK_MONOTONIC_COARSE`, about
//! 3 ns) was a tenth of it. The warm path reads no clock at all: the phase in `word` says
//! everything it needs, and two kinds of timer move it.
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
//! - **The same two deadlines on the process's timer thread, as backstop**
//!   ([`super::timer_thread`]): a Tokio timer only fires while its runtime is driven; a
//!   current-thread runtime entered from time to time with `block_on`, or a multi-thread one
//!   shut down while a worker is blocked (its timers are then never woken), would otherwise
//!   leave a "fresh" phase long after the refresh point. The thread follows the machine's
//!   monotonic clock, whatever the runtimes do. Under `tokio::time::pause()` the time left is
//!   virtual and lies ahead in real time, so the Tokio timer follows the paused clock and the
//!   thread fires only if the test runs longer in real time than the virtual time left (then
//!   the refresh-ahead comes early in virtual terms, as it did with the coarse clock before).
//! - If the timer thread cannot be started, or the Tokio timers' runtime shut down (the driver
//!   wakes its timers then, before their deadlines), the phase says "read the clock" and the
//!   warm path reads Tokio's clock as it did before. (With the thread running, the shutdown
//!   case could keep the phase; it does not, so that a token used from another runtime whose
//!   clock is paused follows that clock.)
//! - **Not across `fork`.** A child process made by `fork` has no timer thread, and the
//!   parent's Tokio timers do not run there: a token published before the fork would stay
//!   "fresh" in the child. Tokens published in the child get the "read the clock" phase. Use a
//!   layer in the process that built it (Tokio itself does not support a runtime across fork).
//!
//! **Bound on serving past the refresh point:** how late the timer thread wakes after a
//! deadline: the operating system's wake-up latency for a sleeping thread (microseconds on an
//! idle machine, the scheduler's time slice, a few milliseconds, on a busy one); under a paused
//! Tokio clock, none (the phase changes while the driver processes the timers, before
//! `advance()` returns to its caller), give or take Tokio's 1 ms timer resolution. The refresh
//! point precedes expiry by the refresh margin (at least 10 % of the lifetime, 100 ms for a 1 s
//! token), so a token is served past its expiry on the warm path only if the timer thread is
//! kept off every core for longer than that margin.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

use arc_swap::{ArcSwapOption, Guard};
use tokio::time::{Instant, Sleep};

use super::timer_thread::ThreadTimer;
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

pub(super) fn pack(generation: u64, phase: u64) -> u64 {
    // The phase fits in the low PHASE_BITS that the shift leaves zero, so `^` here would give
    // the same word: an equivalent mutant.
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

/// `at` (on Tokio's clock) on the machine's monotonic clock: now plus the time left until `at`.
/// Under a paused Tokio clock the time left is virtual and lies ahead in real time, so the
/// timer thread never fires before the Tokio timer does. `None` when it lies too far ahead to
/// be represented: it never comes.
fn real_time_deadline(at: Instant) -> Option<std::time::Instant> {
    std::time::Instant::now().checked_add(at.saturating_duration_since(Instant::now()))
}

/// Keeps the word read on every request on its own cache line, away from the `Arc` reference
/// counts and the mutex that other cores write.
#[repr(align(128))]
pub(super) struct CacheLine<T>(pub(super) T);

pub(super) type Word = Arc<CacheLine<AtomicU64>>;

/// The timers of the published token, at its refresh-ahead and refresh points; dropping them
/// disarms them.
struct Timers {
    /// Tokio timers (when published inside a runtime). Not tasks: each is a Tokio `Sleep` polled
    /// once with a [`PhaseWaker`], so the phase changes inside the timer driver's own
    /// processing, before any task or `block_on` future runs again. They follow Tokio's clock,
    /// paused or not.
    _tokio: Option<[Pin<Box<Sleep>>; 2]>,
    /// The same deadlines on the process's timer thread, which follows the machine's clock
    /// whatever the runtimes do. `None` for a deadline too far ahead to come.
    _thread: [Option<ThreadTimer>; 2],
}

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
        // The previous generation's timers, disarmed.
        *timers = None;
        let Some(token) = token else {
            self.token.store(None);
            self.word.0.store(pack(NO_TOKEN, STALE), Ordering::Release);
            return;
        };
        self.token.store(Some(Arc::new(token.clone())));
        let generation = token.generation;
        let phase = phase_at(Instant::now(), token);
        // The phase is stored before the timers are armed, so a timer that fires at once
        // (its deadline passed meanwhile) moves it forward rather than being overwritten.
        self.word
            .0
            .store(pack(generation, phase), Ordering::Release);
        if phase == STALE {
            return;
        }
        let deadlines = [(AHEAD, token.refresh_ahead_at), (STALE, token.refresh_at)];
        let mut thread_timers = [None, None];
        for (timer, (phase, deadline)) in thread_timers.iter_mut().zip(deadlines) {
            let Some(real_time) = real_time_deadline(deadline) else {
                continue;
            };
            match ThreadTimer::arm(real_time, &self.word, generation, phase) {
                Some(armed) => *timer = Some(armed),
                None => {
                    // No timer thread: nothing backs the Tokio timers up.
                    advance_phase(&self.word, generation, CLOCK);
                    return;
                }
            }
        }
        let tokio_timers = tokio::runtime::Handle::try_current()
            .is_ok()
            .then(|| deadlines.map(|(phase, deadline)| self.arm(generation, phase, deadline)));
        *timers = Some(Timers {
            _tokio: tokio_timers,
            _thread: thread_timers,
        });
    }

    /// A timer that sets `phase` for `generation` at `deadline`.
    fn arm(&self, generation: u64, phase: u64, deadline: Instant) -> Pin<Box<Sleep>> {
        let mut sleep = Box::pin(tokio::time::sleep_until(deadline));
        let phase_waker = Arc::new(PhaseWaker {
            word: Arc::clone(&self.word),
            generation,
            phase,
            deadline,
        });
        let waker = Waker::from(Arc::clone(&phase_waker));
        // Registers it with the timer driver. A deadline that passed since the caller computed
        // the phase comes back ready: the driver fires such an entry as it registers it, before
        // the waker is stored, so the waker would never run. Set the phase here instead.
        if sleep
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            phase_waker.wake_by_ref();
        }
        sleep
    }
}

/// Sets the phase of `generation` if it is still the published one. Phases only move forward
/// (fresh, refresh-ahead due, stale); "read the clock" replaces any but stale.
pub(super) fn advance_phase(word: &Word, generation: u64, phase: u64) {
    let _ = word
        .0
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            // `>=` in the last test would only rewrite the same word (an equivalent mutant).
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::super::timer_thread::tests::{armed_on, wait_for};
    use super::*;

    fn token(generation: u64, refresh_ahead_at: Instant, refresh_at: Instant) -> LocalToken {
        let header = HeaderValue::from_static("Bearer t");
        LocalToken::new(generation, header, refresh_at, refresh_ahead_at)
    }

    #[test]
    fn a_phase_moves_forward_only_for_its_own_generation_and_never_leaves_stale() {
        let word: Word = Arc::new(CacheLine(AtomicU64::new(pack(5, FRESH))));
        let read = || word.0.load(Ordering::Acquire);
        advance_phase(&word, 4, AHEAD);
        assert_eq!(read(), pack(5, FRESH), "an older generation's timer");
        advance_phase(&word, 5, AHEAD);
        assert_eq!(read(), pack(5, AHEAD));
        advance_phase(&word, 5, FRESH);
        assert_eq!(read(), pack(5, AHEAD), "never backwards");
        advance_phase(&word, 5, STALE);
        assert_eq!(read(), pack(5, STALE));
        advance_phase(&word, 5, CLOCK);
        assert_eq!(read(), pack(5, STALE), "stale stays stale");
    }

    #[tokio::test(start_paused = true)]
    async fn phase_timers_mark_refresh_ahead_then_stale_at_their_deadlines() {
        let published = Published::new();
        let now = Instant::now();
        let ahead = now + Duration::from_secs(5);
        published.store(Some(&token(7, ahead, now + Duration::from_secs(10))));
        assert_eq!(published.word(), pack(7, FRESH));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(published.word(), pack(7, AHEAD), "not 'read the clock'");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(published.word(), pack(7, STALE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_armed_after_its_deadline_sets_its_phase_at_once() {
        let published = Published::new();
        let now = Instant::now();
        published.word.0.store(pack(9, FRESH), Ordering::Release);
        // The refresh-ahead point passed between computing the phase and arming the timer.
        let _timer = published.arm(9, AHEAD, now - Duration::from_millis(5));
        assert_eq!(published.word(), pack(9, AHEAD));
    }

    #[test]
    fn without_a_runtime_the_timer_thread_alone_moves_the_phase() {
        let published = Published::new();
        let now = Instant::now();
        let ahead = now + Duration::from_millis(100);
        published.store(Some(&token(2, ahead, ahead + Duration::from_millis(20))));
        assert_eq!(phase_of(published.word()), FRESH);
        wait_for(&published.word, pack(2, STALE));
    }

    #[test]
    fn a_runtime_that_is_not_driven_does_not_keep_a_token_fresh() {
        // Its Tokio timers never fire (a current-thread runtime left alone; likewise a
        // multi-thread one shut down while a worker is blocked): the timer thread moves the
        // phase at the deadline in real time.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let published = Published::new();
        {
            let _entered = runtime.enter();
            let now = Instant::now();
            let ahead = now + Duration::from_millis(100);
            published.store(Some(&token(6, ahead, now + Duration::from_secs(3600))));
        }
        assert_eq!(published.word(), pack(6, FRESH));
        wait_for(&published.word, pack(6, AHEAD));
    }

    #[test]
    fn replacing_or_dropping_the_token_disarms_its_timers() {
        let published = Published::new();
        let far = Instant::now() + Duration::from_secs(3600);
        published.store(Some(&token(1, far, far)));
        assert_eq!(armed_on(&published.word), 2);
        published.store(Some(&token(2, far, far)));
        assert_eq!(armed_on(&published.word), 2, "only the new token's");
        published.store(None);
        assert_eq!(armed_on(&published.word), 0);
        published.store(Some(&token(3, far, far)));
        let word = Arc::downgrade(&published.word);
        drop(published);
        assert!(
            word.upgrade().is_none(),
            "no armed timer keeps the word alive"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_published_past_its_points_gets_the_phase_it_is_in() {
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        let published = Published::new();
        let past = now - Duration::from_secs(1);
        published.store(Some(&token(3, past, now + Duration::from_secs(10))));
        assert_eq!(published.word(), pack(3, AHEAD));
        published.store(Some(&token(4, past, past)));
        assert_eq!(published.word(), pack(4, STALE));
        published.store(None);
        assert_eq!(published.word(), pack(NO_TOKEN, STALE));
    }
}
