//! Ordered parallel work on std scoped threads with bounded channels.
//!
//! A producer submits items; a pool of workers transforms them in any
//! order; a consumer receives the results in submission order. Each item
//! travels with a one-shot reply channel, and the consumer is handed the
//! reply channels in order through a bounded queue: that queue bounds how
//! many items are in flight (and so the memory), and no result ever needs
//! to wait in a reorder buffer.
//!
//! Shutdown needs no flag: when the producer drops its [`Submitter`], the
//! workers drain and stop and the consumer sees the end of the queue; when
//! the consumer drops its receiver, the producer's next submit fails.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::Scope;

/// The other end has gone: the consumer stopped (and knows why).
#[derive(Debug)]
pub(crate) struct Closed;

type Job<I, O> = (I, SyncSender<O>);

pub(crate) struct Submitter<I, O> {
    jobs: SyncSender<Job<I, O>>,
    order: SyncSender<Receiver<O>>,
}

impl<I, O> Submitter<I, O> {
    /// Queues `item` for a worker; blocks while too many are in flight.
    pub(crate) fn submit(&self, item: I) -> Result<(), Closed> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.order.send(rx).map_err(|_| Closed)?;
        self.jobs.send((item, tx)).map_err(|_| Closed)
    }

    /// Queues a result that needs no work, in order with the others.
    pub(crate) fn submit_done(&self, out: O) -> Result<(), Closed> {
        let (tx, rx) = mpsc::sync_channel(1);
        // Cannot fail: rx is alive and the channel has room for one.
        let _ = tx.send(out);
        self.order.send(rx).map_err(|_| Closed)
    }
}

/// The consumer's end: results in submission order. `None` once the
/// producer is done and everything it submitted was received.
pub(crate) struct Results<O> {
    order: Receiver<Receiver<O>>,
}

impl<O> Results<O> {
    /// The next result. `Some(Err(Closed))` means a worker vanished without
    /// answering, which only a panic in a worker can cause.
    pub(crate) fn next(&self) -> Option<Result<O, Closed>> {
        let rx = self.order.recv().ok()?;
        Some(rx.recv().map_err(|_| Closed))
    }
}

/// Starts `threads` workers, each with its own state from `init` (a zstd
/// context, say), applying `work` to every submitted item.
pub(crate) fn start<'scope, I, O, St, Init, Work>(
    scope: &'scope Scope<'scope, '_>,
    threads: usize,
    init: Init,
    work: Work,
) -> (Submitter<I, O>, Results<O>)
where
    I: Send + 'scope,
    O: Send + 'scope,
    Init: Fn() -> St + Clone + Send + 'scope,
    Work: Fn(&mut St, I) -> O + Clone + Send + 'scope,
{
    let threads = threads.max(1);
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job<I, O>>(threads);
    let (order_tx, order_rx) = mpsc::sync_channel(2 * threads + 2);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    for _ in 0..threads {
        let (jobs_rx, init, work) = (jobs_rx.clone(), init.clone(), work.clone());
        scope.spawn(move || {
            let mut state = init();
            loop {
                // The lock is held only while waiting for the next job.
                let job = match jobs_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((item, reply)) = job else { return };
                // The consumer may have stopped: nobody to tell.
                let _ = reply.send(work(&mut state, item));
            }
        });
    }
    (
        Submitter {
            jobs: jobs_tx,
            order: order_tx,
        },
        Results { order: order_rx },
    )
}

/// Buffers handed back for reuse: fresh allocations of a chunk's size
/// cost a page fault per page (and an munmap) every time.
#[derive(Clone)]
pub(crate) struct Pool {
    tx: SyncSender<Vec<u8>>,
    rx: Arc<Mutex<Receiver<Vec<u8>>>>,
    /// Every buffer it makes has room for this much (a chunk).
    min: usize,
}

impl Pool {
    pub(crate) fn new(buffers: usize, min: usize) -> Pool {
        let (tx, rx) = mpsc::sync_channel(buffers);
        Pool {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            min,
        }
    }

    /// An empty buffer with room for at least `capacity` bytes.
    pub(crate) fn get(&self, capacity: usize) -> Vec<u8> {
        let mut v = self.reuse(capacity);
        v.clear();
        v
    }

    /// A buffer of exactly `len` bytes to be overwritten in full: a reused
    /// one keeps its old bytes, so only what it never held is zeroed (a
    /// chunk-sized memset per chunk was a pass over every byte read).
    pub(crate) fn get_len(&self, len: usize) -> Vec<u8> {
        let mut v = self.reuse(len);
        v.resize(len, 0);
        v
    }

    fn reuse(&self, capacity: usize) -> Vec<u8> {
        let reused = self.rx.lock().ok().and_then(|rx| rx.try_recv().ok());
        match reused {
            Some(v) if v.capacity() >= capacity => v,
            _ => Vec::with_capacity(capacity.max(self.min)),
        }
    }

    pub(crate) fn put(&self, v: Vec<u8>) {
        if v.capacity() >= self.min {
            // A full pool drops it.
            let _ = self.tx.try_send(v);
        }
    }
}

/// Worker threads to use for `requested` (0 = one per core).
pub(crate) fn threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_submission_order_whatever_the_work_time() {
        let out: Vec<u64> = std::thread::scope(|s| {
            let (sub, results) = start(
                s,
                4,
                || (),
                |_: &mut (), i: u64| {
                    // Later items finish first.
                    std::thread::sleep(std::time::Duration::from_micros((50 - i % 50) * 20));
                    i * 2
                },
            );
            let consumer = s.spawn(move || {
                let mut v = Vec::new();
                while let Some(r) = results.next() {
                    v.push(r.unwrap());
                }
                v
            });
            for i in 0..200 {
                if i % 7 == 0 {
                    sub.submit_done(i * 2).unwrap();
                } else {
                    sub.submit(i).unwrap();
                }
            }
            drop(sub);
            consumer.join().unwrap()
        });
        assert_eq!(out, (0..200).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn a_consumer_that_stops_makes_submit_fail_instead_of_hanging() {
        std::thread::scope(|s| {
            let (sub, results) = start(s, 2, || (), |_: &mut (), i: u32| i);
            drop(results);
            let mut failed = false;
            for i in 0..100 {
                if sub.submit(i).is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(failed);
        });
    }
}
