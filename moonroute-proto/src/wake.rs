//! An event loop's wake-up signal, independent of any async runtime: other threads (a
//! location store's flusher, `ctl dlg end`) [`WakeSignal::wake`] a loop when something it waits
//! for may be ready, and the shell that runs the loop turns that into an `Input::Wake` for its
//! Worker: a tokio shell awaits [`WakeSignal::woken`], a simulated-time driver asks
//! [`WakeSignal::take`] between its steps.
//!
//! A wake given while nobody waits is kept (one, not counted) for the next wait, so a wake-up
//! is never lost between a check and a wait; several wakes before the loop runs are one.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
pub struct WakeSignal {
    /// A wake not yet taken by the loop.
    woken: AtomicBool,
    /// The loop's task waiting in [`WakeSignal::woken`], if it waits.
    waiter: Mutex<Option<Waker>>,
}

impl WakeSignal {
    pub fn new() -> Arc<WakeSignal> {
        Arc::new(WakeSignal::default())
    }

    /// Wakes the loop: its waiting task now, or its next wait.
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        let waiter = self.waiter().take();
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }

    /// Whether a wake came since the last one taken; takes it.
    pub fn take(&self) -> bool {
        self.woken.swap(false, Ordering::AcqRel)
    }

    /// Waits for the next wake (or returns at once for one already given) and takes it.
    pub async fn woken(&self) {
        poll_fn(|cx| self.poll_woken(cx)).await
    }

    fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.take() {
            return Poll::Ready(());
        }
        *self.waiter() = Some(cx.waker().clone());
        // A wake between the check above and registering the waker found no waker to wake:
        // check again now that it is registered.
        if self.take() {
            self.waiter().take();
            return Poll::Ready(());
        }
        Poll::Pending
    }

    fn waiter(&self) -> MutexGuard<'_, Option<Waker>> {
        self.waiter.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::thread::{self, Thread};
    use std::time::{Duration, Instant};

    use super::*;

    /// Unparks the test's thread: enough of an executor to await one future.
    struct Unpark(Thread);

    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Awaits `future` on this thread; fails the test after 10 s.
    pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = pin!(future);
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
            assert!(Instant::now() < give_up, "the wake was lost");
            thread::park_timeout(Duration::from_millis(100));
        }
    }

    #[test]
    fn a_wake_before_the_wait_is_kept_once() {
        let signal = WakeSignal::new();
        assert!(!signal.take());
        signal.wake();
        signal.wake();
        assert!(signal.take());
        assert!(!signal.take());
        signal.wake();
        block_on(signal.woken());
        assert!(!signal.take());
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_wait() {
        let signal = WakeSignal::new();
        for _ in 0..100 {
            let waker = {
                let signal = Arc::clone(&signal);
                thread::spawn(move || signal.wake())
            };
            block_on(signal.woken());
            waker.join().unwrap();
        }
        assert!(!signal.take());
    }
}
