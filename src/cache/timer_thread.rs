//! The real-time phase timers: one thread per process that moves a published token's phase at
//! its refresh-ahead and refresh points on the machine's monotonic clock, whatever any Tokio
//! runtime is doing.
//!
//! The Tokio phase timers (see [`super::snapshot`]) fire only while their runtime is driven: a
//! current-thread runtime left alone, or a multi-thread runtime shut down while one of its
//! workers is blocked, never fires them. This thread is their backstop, so the warm path needs
//! no clock read of its own: it sleeps on a condition variable until the earliest deadline of
//! all armed timers, sets the phases that are due, and sleeps again; with nothing armed it
//! waits without a timeout (no wake-up when idle). Two wake-ups per token lifetime, as for the
//! Tokio timers. Started by the first token published in the process; if it cannot be started
//! (the process is out of threads), no timer is armed and the warm path reads Tokio's clock
//! instead (the [`CLOCK`](super::snapshot::CLOCK) phase).

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use super::snapshot::{advance_phase, Word};

/// One armed phase change; dropping it disarms it.
pub(super) struct ThreadTimer {
    key: Key,
}

/// Deadline first, so the map's first entry is the next one due; the number makes keys unique.
type Key = (Instant, u64);

struct Entry {
    word: Word,
    generation: u64,
    phase: u64,
}

#[derive(Default)]
struct Armed {
    entries: BTreeMap<Key, Entry>,
    next_number: u64,
}

struct TimerThread {
    armed: Mutex<Armed>,
    /// Signalled when a timer is armed ahead of every other one.
    earlier_deadline: Condvar,
}

impl ThreadTimer {
    /// Sets `phase` for `generation` in `word` once the monotonic clock reaches `deadline`
    /// (already past: at once, on the thread). `None` when the timer thread could not be
    /// started.
    pub(super) fn arm(deadline: Instant, word: &Word, generation: u64, phase: u64) -> Option<Self> {
        let thread = TimerThread::get()?;
        let mut armed = thread.lock();
        let key = (deadline, armed.next_number);
        armed.next_number += 1;
        let entry = Entry {
            word: Word::clone(word),
            generation,
            phase,
        };
        armed.entries.insert(key, entry);
        if armed
            .entries
            .first_key_value()
            .is_some_and(|(first, _)| *first == key)
        {
            thread.earlier_deadline.notify_one();
        }
        Some(Self { key })
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // Armed only once the thread exists.
        if let Some(thread) = TimerThread::get() {
            thread.lock().entries.remove(&self.key);
        }
    }
}

impl TimerThread {
    /// The process's timer thread, started on first use; `None` if it could not be started, or
    /// in a child process made by `fork` (which has no such thread, and whose copy of the map
    /// may be locked forever). Called when a token is published or replaced, never per request.
    fn get() -> Option<&'static TimerThread> {
        static THREAD: OnceLock<Option<(&'static TimerThread, u32)>> = OnceLock::new();
        let &(thread, process) = THREAD
            .get_or_init(|| {
                let thread: &'static TimerThread = Box::leak(Box::new(TimerThread {
                    armed: Mutex::new(Armed::default()),
                    earlier_deadline: Condvar::new(),
                }));
                std::thread::Builder::new()
                    .name("nuvy-oauth2-timers".into())
                    .spawn(move || thread.run())
                    .ok()
                    .map(|_| (thread, std::process::id()))
            })
            .as_ref()?;
        (process == std::process::id()).then_some(thread)
    }

    fn lock(&self) -> MutexGuard<'_, Armed> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.armed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) -> ! {
        let mut armed = self.lock();
        loop {
            let now = Instant::now();
            while let Some(due) = armed
                .entries
                .first_entry()
                .filter(|first| first.key().0 <= now)
            {
                let entry = due.remove();
                advance_phase(&entry.word, entry.generation, entry.phase);
            }
            armed = match armed.entries.first_key_value() {
                Some((&(deadline, _), _)) => {
                    self.earlier_deadline
                        .wait_timeout(armed, deadline.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .earlier_deadline
                    .wait(armed)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::snapshot::{pack, CacheLine, AHEAD, FRESH, STALE};
    use super::*;

    fn word(generation: u64, phase: u64) -> Word {
        Arc::new(CacheLine(AtomicU64::new(pack(generation, phase))))
    }

    /// How many timers are armed on `word`.
    pub(in crate::cache) fn armed_on(word: &Word) -> usize {
        let thread = TimerThread::get().unwrap();
        let armed = thread.lock();
        armed
            .entries
            .values()
            .filter(|entry| Arc::ptr_eq(&entry.word, word))
            .count()
    }

    /// Waits (up to 10 s, then fails) for the timer thread to set `word` to `expected`.
    pub(in crate::cache) fn wait_for(word: &Word, expected: u64) {
        let give_up = Instant::now() + Duration::from_secs(10);
        while word.0.load(Ordering::Acquire) != expected {
            assert!(
                Instant::now() < give_up,
                "the timer thread never set the phase"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_thread_sets_a_due_phase_with_no_runtime_running() {
        let word = word(4, FRESH);
        let _ahead = ThreadTimer::arm(Instant::now(), &word, 4, AHEAD).unwrap();
        wait_for(&word, pack(4, AHEAD));
        // A timer armed behind one that sleeps far ahead still wakes the thread in time.
        let _far = ThreadTimer::arm(Instant::now() + Duration::from_secs(3600), &word, 4, STALE);
        let _stale = ThreadTimer::arm(Instant::now(), &word, 4, STALE).unwrap();
        wait_for(&word, pack(4, STALE));
    }

    #[test]
    fn timers_with_the_same_deadline_are_all_kept() {
        let (first, second) = (word(1, FRESH), word(1, FRESH));
        let far = Instant::now() + Duration::from_secs(3600);
        let _timers = [
            ThreadTimer::arm(far, &first, 1, AHEAD),
            ThreadTimer::arm(far, &first, 1, STALE),
            ThreadTimer::arm(far, &second, 1, STALE),
        ];
        assert_eq!((armed_on(&first), armed_on(&second)), (2, 1));
    }

    #[test]
    fn a_dropped_timer_is_disarmed() {
        let word = word(1, FRESH);
        let far = Instant::now() + Duration::from_secs(3600);
        let timer = ThreadTimer::arm(far, &word, 1, STALE).unwrap();
        assert_eq!(armed_on(&word), 1);
        drop(timer);
        assert_eq!(armed_on(&word), 0);
    }
}
