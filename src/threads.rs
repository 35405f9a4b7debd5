//! Keeps the compute pool's idle workers looking for work through a training step, instead of
//! going to sleep between its parallel operations.
//!
//! A step is hundreds of parallel operations with short serial stretches between them (burn's
//! bookkeeping, small ops). An idle rayon worker yields 33 times (tens of microseconds) and
//! then sleeps, so most operations began by waking it through the kernel, and it joined late
//! (width 0.25: 20,500 context switches over a bench, 1.80 of 2 CPUs busy). OpenMP, under
//! PyTorch, keeps its threads spinning for a while for the same reason.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a spinning worker may find no work before it stops and lets rayon put it to
/// sleep: past a serial stretch this long, waking it costs little in comparison. It also
/// bounds the wait where a spinner started inside a job that another thread waits on.
const IDLE_LIMIT: Duration = Duration::from_millis(10);

/// Live [`SpinningWorkers`] guards, process-wide: spinners run while there is one, so that a
/// spinner from one step carries on into the next.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread already runs a spinner (further below on its stack).
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the current rayon pool's other workers spin, taking jobs as soon as they are
/// queued. Hold one for the length of a training step; the spinners stop when the last guard
/// is dropped.
#[must_use = "the workers spin only while the guard lives"]
pub struct SpinningWorkers(());

impl SpinningWorkers {
    pub fn start() -> Self {
        ACTIVE.fetch_add(1, Ordering::AcqRel);
        let caller = rayon::current_thread_index();
        if rayon::current_num_threads() > 1 {
            rayon::spawn_broadcast(move |context| {
                if Some(context.index()) != caller {
                    spin();
                }
            });
        }
        SpinningWorkers(())
    }
}

impl Drop for SpinningWorkers {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs the pool's queued jobs as they appear, until no guard is live or no work has come for
/// [`IDLE_LIMIT`]. A second spinner on the same thread (started by a job that the first one
/// took) returns at once: it would hold up that job until the guards are gone.
fn spin() {
    if SPINNING.get() {
        return;
    }
    SPINNING.set(true);
    let mut idle_since = Instant::now();
    while ACTIVE.load(Ordering::Acquire) > 0 {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            _ if idle_since.elapsed() > IDLE_LIMIT => break,
            _ => std::hint::spin_loop(),
        }
    }
    SPINNING.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn parallel_work_under_a_guard_completes_and_the_spinners_stop() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for step in 0..20u64 {
                let _spinning = SpinningWorkers::start();
                // The two workers other than this one spin (a job runs inside their loop).
                let spinning = rayon::broadcast(|_| SPINNING.get());
                assert_eq!(spinning.iter().filter(|&&s| s).count(), 2, "{spinning:?}");
                // Nested joins, as the step's operations make them.
                let sum: u64 = (0..10_000u64)
                    .into_par_iter()
                    .map(|i| (0..i % 7).into_par_iter().sum::<u64>() + step)
                    .sum();
                let expected: u64 = (0..10_000u64).map(|i| (0..i % 7).sum::<u64>() + step).sum();
                assert_eq!(sum, expected);
            }
        });
        // With this test's guards gone (other tests may hold some), every spinner of the pool
        // leaves its loop: when the guards are gone, or when no work came for a while.
        let started = Instant::now();
        while pool.broadcast(|_| SPINNING.get()).iter().any(|&s| s) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a spinner kept going"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
