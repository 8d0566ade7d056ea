//! Running scenarios several at a time (`kupgrade-vm run --jobs N`): worker
//! threads take the next one from a shared queue, and the caller's thread
//! gets each result as it comes, to print and record whole.

use std::collections::VecDeque;
use std::sync::{mpsc, Mutex, PoisonError};
use std::thread;

/// Runs `work` on each item, at most `jobs` at once, in the items' order
/// of starting, and hands each result to `done` on the calling thread as
/// it finishes. Once `stopped` says so, no further item starts.
pub fn run_all<T: Send, R: Send>(
    items: Vec<T>,
    jobs: usize,
    stopped: impl Fn() -> bool + Sync,
    work: impl Fn(T) -> R + Sync,
    mut done: impl FnMut(R),
) {
    let workers = jobs.clamp(1, items.len().max(1));
    let queue = Mutex::new(VecDeque::from(items));
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        for _ in 0..workers {
            let (tx, queue, stopped, work) = (tx.clone(), &queue, &stopped, &work);
            s.spawn(move || loop {
                if stopped() {
                    break;
                }
                // Taken and released at once: the lock is never held while working.
                let next = queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                let Some(item) = next else { break };
                if tx.send(work(item)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for r in rx {
            done(r);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn every_item_runs_once_with_at_most_jobs_at_a_time() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let mut got = Vec::new();
        run_all(
            (0..10).collect(),
            3,
            || false,
            |i: usize| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(50));
                running.fetch_sub(1, Ordering::SeqCst);
                i * 10
            },
            |r| got.push(r),
        );
        got.sort();
        assert_eq!(got, (0..10).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn results_come_as_they_finish() {
        let mut finished = Vec::new();
        run_all(
            vec![500u64, 10, 10, 10],
            2,
            || false,
            |ms| {
                thread::sleep(Duration::from_millis(ms));
                ms
            },
            |ms| finished.push(ms),
        );
        // The short ones finish on one worker while the long one still runs.
        assert_eq!(finished, vec![10, 10, 10, 500]);
    }

    #[test]
    fn one_job_runs_the_items_one_after_another_in_order() {
        let mut got = Vec::new();
        run_all(vec!["a", "b", "c"], 1, || false, |s| s, |s| got.push(s));
        assert_eq!(got, vec!["a", "b", "c"]);
    }

    #[test]
    fn no_item_starts_after_a_stop() {
        let stop = AtomicBool::new(false);
        let ran = AtomicUsize::new(0);
        run_all(
            (0..10).collect(),
            2,
            || stop.load(Ordering::SeqCst),
            |i: usize| {
                ran.fetch_add(1, Ordering::SeqCst);
                if i == 0 {
                    stop.store(true, Ordering::SeqCst);
                }
                // The other worker's item ends after the stop.
                while !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
            },
            |()| {},
        );
        // The first item and at most the one the other worker took meanwhile.
        let ran = ran.load(Ordering::SeqCst);
        assert!((1..=2).contains(&ran), "{ran} items ran");
    }
}
