//! The one shutdown signal of a process: SIGTERM or SIGINT (or [`Shutdown::trigger`]) sets
//! it once, and everything that runs until shutdown waits on it instead of polling a flag of
//! its own: periodic work sleeps in [`Shutdown::wait_timeout`] (woken at once on shutdown),
//! threads with nothing else to do block in [`Shutdown::wait`], async code awaits it on a
//! blocking task.

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// Cloneable handle; every clone sees the same signal.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Read without the lock by code between blocking calls with their own timeouts.
    flag: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A signal only [`Shutdown::trigger`] sets (tests, embedded use).
    pub fn new() -> Self {
        Self::default()
    }

    /// A signal SIGTERM and SIGINT set. The signals are delivered to a thread of its own
    /// (signal-hook's self-pipe), which blocks until one arrives.
    pub fn on_signals() -> std::io::Result<Self> {
        let shutdown = Self::new();
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])?;
        let handle = shutdown.clone();
        std::thread::Builder::new()
            .name("membrane-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    tracing::info!(signal, "shutting down");
                    handle.trigger();
                }
            })?;
        Ok(shutdown)
    }

    /// Sets the signal (idempotent) and wakes every waiter.
    pub fn trigger(&self) {
        let _guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.flag.store(true, Ordering::SeqCst);
        self.inner.changed.notify_all();
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// The flag itself, for code that checks it between blocking calls bounded by their own
    /// timeouts (a socket read, a ring-buffer wait).
    pub fn flag(&self) -> &AtomicBool {
        &self.inner.flag
    }

    /// Blocks until the signal is set.
    pub fn wait(&self) {
        let mut guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.is_triggered() {
            guard = self
                .inner
                .changed
                .wait(guard)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sleeps for `duration` or until the signal is set, whichever comes first; returns
    /// whether it is set. `while !shutdown.wait_timeout(period) { work() }` runs `work` every
    /// period and ends at once on shutdown.
    pub fn wait_timeout(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut guard = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.is_triggered() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .inner
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_wakes_a_long_wait_at_once() {
        let shutdown = Shutdown::new();
        let waiter = {
            let s = shutdown.clone();
            std::thread::spawn(move || s.wait_timeout(Duration::from_secs(600)))
        };
        std::thread::sleep(Duration::from_millis(20));
        shutdown.trigger();
        assert!(waiter.join().expect("waiter"), "woken by the trigger");
        assert!(shutdown.wait_timeout(Duration::ZERO));
    }

    #[test]
    fn an_untriggered_wait_times_out() {
        assert!(!Shutdown::new().wait_timeout(Duration::from_millis(5)));
    }
}
