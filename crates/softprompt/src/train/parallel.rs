//! Data-parallel training: the [`Collective`] operations an engine (MPI, NCCL) provides, and
//! [`Parallel`], the handle a [`TrainConfig`](super::TrainConfig) carries, which builds the
//! deterministic reductions the step loop needs on top of them.
//!
//! Every rank holds the frozen model and the whole data set, and takes a disjoint,
//! deterministic shard of every global batch ([`shard_range`]). The step loop sums each rank's
//! token-weighted gradient with [`Parallel::all_reduce_sum_f32`], whose result does not depend
//! on the engine's reduction order: each rank owns one chunk of the buffer, receives that chunk
//! from every rank (all-to-all), adds the copies in rank order (rank 0 + rank 1 + ...), and the
//! reduced chunks are gathered back to every rank. So every rank ends with the same bits, run
//! after run, whatever algorithm the MPI library would have picked for `MPI_Allreduce`. Large
//! buffers (model tuning's every weight) are reduced in buckets of [`BUCKET_FLOATS`], which
//! bounds the memory of the exchange; the result is the same for any bucket size.
//!
//! A rank that fails or hangs must not leave the others waiting forever: with more than one
//! rank, a watchdog thread aborts the whole job (the engine's abort, `MPI_Abort`) when a
//! collective has waited longer than the timeout, naming the collective.
//!
//! The single-process value, [`Parallel::single`], is the identity: rank 0 of 1, no thread, no
//! copy.

use crate::{bail, Result};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Floats reduced per exchange: 4 Mi (16 MiB), so a rank holds at most three buffers of this
/// size beyond the gradients (what it sends, receives and gathers).
pub const BUCKET_FLOATS: usize = 1 << 22;

/// The collective operations of a communication engine, over the ranks `0..size()`. Every rank
/// must call the same operations in the same order with buffers of the same lengths.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// The engine's name, for messages (`"mpi"`, `"nccl"`).
    fn name(&self) -> &str;
    /// Sends chunk `k` of `send` (`size()` chunks of `send.len() / size()` floats) to rank `k`;
    /// `recv` gets, as its chunk `k`, what rank `k` sent to this rank.
    fn all_to_all_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `recv` (`size() * send.len()` floats) gets every rank's `send`, in rank order.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// As [`Collective::all_gather_f32`], for `f64`.
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()>;
    /// `buf` on every rank gets `buf` of rank `root`.
    fn broadcast_f64(&self, root: usize, buf: &mut [f64]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with `code` (MPI_Abort). Called from the watchdog thread and
    /// by a program whose rank failed.
    fn abort(&self, code: i32) -> !;
}

/// One process: the identity.
struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn name(&self) -> &str {
        "single process"
    }
    fn all_to_all_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        copy_into(send, recv)
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        copy_into(send, recv)
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        copy_into(send, recv)
    }
    fn broadcast_f64(&self, _root: usize, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

fn copy_into<T: Copy>(send: &[T], recv: &mut [T]) -> Result<()> {
    if send.len() != recv.len() {
        bail!(
            "collective: {} values sent but {} expected",
            send.len(),
            recv.len()
        );
    }
    recv.copy_from_slice(send);
    Ok(())
}

/// The examples `start..end` of a batch of `len` that rank `rank` of `size` computes:
/// contiguous, disjoint, covering the batch, the first `len % size` ranks taking one more.
/// A rank may get none when the batch is smaller than the number of ranks.
pub fn shard_range(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let size = size.max(1);
    let base = len / size;
    let extra = len % size;
    let start = rank * base + rank.min(extra);
    let end = start + base + usize::from(rank < extra);
    start.min(len)..end.min(len)
}

/// The collective being waited for and since when (`None` between collectives), shared with
/// the watchdog.
type Waiting = Mutex<Option<(String, Instant)>>;

/// The collective a training run uses, with its watchdog; cheap to clone. See the module doc.
#[derive(Clone)]
pub struct Parallel {
    engine: Arc<dyn Collective>,
    /// What is being waited for and since when; `None` with one rank (no watchdog).
    watch: Option<Arc<Waiting>>,
    /// Seconds spent in collectives since the last [`Parallel::take_comm_seconds`].
    comm_seconds: Arc<Mutex<f64>>,
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Parallel({}, rank {} of {})",
            self.engine.name(),
            self.rank(),
            self.size()
        )
    }
}

impl Default for Parallel {
    fn default() -> Self {
        Parallel::single()
    }
}

impl Parallel {
    /// One process (the identity).
    pub fn single() -> Self {
        Parallel {
            engine: Arc::new(SingleProcess),
            watch: None,
            comm_seconds: Arc::new(Mutex::new(0.0)),
        }
    }

    /// `engine`'s ranks; with more than one, a watchdog aborts the job when a collective waits
    /// longer than `timeout` (a failed or hung rank).
    pub fn new(engine: Arc<dyn Collective>, timeout: Duration) -> Self {
        let watch = (engine.size() > 1).then(|| {
            let watch = Arc::new(Mutex::new(None));
            spawn_watchdog(Arc::downgrade(&watch), engine.clone(), timeout);
            watch
        });
        Parallel {
            engine,
            watch,
            comm_seconds: Arc::new(Mutex::new(0.0)),
        }
    }

    pub fn rank(&self) -> usize {
        self.engine.rank()
    }

    pub fn size(&self) -> usize {
        self.engine.size()
    }

    /// Rank 0, the one that writes checkpoints, metrics, plots and exports.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// Ends the whole job with `code` (every rank), after a rank's error.
    pub fn abort(&self, code: i32) -> ! {
        self.engine.abort(code)
    }

    /// Waits for every rank.
    pub fn barrier(&self, what: &str) -> Result<()> {
        self.watched(what, || self.engine.barrier())
    }

    /// Seconds spent in collectives since the last call (for the all-reduce time per step).
    pub fn take_comm_seconds(&self) -> f64 {
        let mut s = self
            .comm_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *s)
    }

    /// Element-wise sum of `buf` over the ranks, into `buf` on every rank, added in rank order
    /// (see the module doc), in buckets of [`BUCKET_FLOATS`].
    pub fn all_reduce_sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        self.watched(what, || {
            for bucket in buf.chunks_mut(BUCKET_FLOATS) {
                self.reduce_bucket(bucket)?;
            }
            Ok(())
        })
    }

    /// One bucket: each rank sums its chunk in rank order, then every chunk is gathered.
    fn reduce_bucket(&self, buf: &mut [f32]) -> Result<()> {
        let size = self.size();
        // Every rank's chunk has the same length: the buffer is padded with zeros.
        let chunk = buf.len().div_ceil(size);
        let mut send = vec![0f32; chunk * size];
        send[..buf.len()].copy_from_slice(buf);
        let mut recv = vec![0f32; chunk * size];
        self.engine.all_to_all_f32(&send, &mut recv)?;
        // recv: chunk `rank` of rank 0, of rank 1, ...: summed in that order.
        let mut mine = recv[..chunk].to_vec();
        for from in recv.chunks(chunk).skip(1) {
            for (m, x) in mine.iter_mut().zip(from) {
                *m += x;
            }
        }
        self.engine.all_gather_f32(&mine, &mut send)?;
        buf.copy_from_slice(&send[..buf.len()]);
        Ok(())
    }

    /// Element-wise sum of a few `f64` values (token counts, loss sums) over the ranks, in rank
    /// order, into `buf` on every rank.
    pub fn all_reduce_sum_f64(&self, what: &str, buf: &mut [f64]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        self.watched(what, || {
            let mut all = vec![0f64; buf.len() * self.size()];
            self.engine.all_gather_f64(buf, &mut all)?;
            buf.copy_from_slice(&all[..buf.len()]);
            for from in all.chunks(buf.len().max(1)).skip(1) {
                for (b, x) in buf.iter_mut().zip(from) {
                    *b += x;
                }
            }
            Ok(())
        })
    }

    /// `buf` of rank 0, on every rank.
    pub fn broadcast_f64(&self, what: &str, buf: &mut [f64]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        self.watched(what, || self.engine.broadcast_f64(0, buf))
    }

    /// Runs the collective `op`, watched by the watchdog and timed.
    fn watched<T>(&self, what: &str, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        if let Some(watch) = &self.watch {
            *watch.lock().unwrap_or_else(|e| e.into_inner()) = Some((what.to_string(), started));
        }
        let out = op();
        if let Some(watch) = &self.watch {
            *watch.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        *self
            .comm_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += started.elapsed().as_secs_f64();
        out.map_err(|e| {
            crate::Error::invalid(format!(
                "{} rank {} of {}: {what}: {e}",
                self.engine.name(),
                self.rank(),
                self.size()
            ))
        })
    }
}

/// Exit code of a job the watchdog ended.
pub const WATCHDOG_EXIT_CODE: i32 = 124;

/// Polls `watch` until the [`Parallel`] owning it is dropped; aborts the job when one
/// collective has waited longer than `timeout`.
fn spawn_watchdog(
    watch: Weak<Waiting>,
    engine: Arc<dyn Collective>,
    timeout: Duration,
) {
    let poll = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    std::thread::spawn(move || loop {
        std::thread::sleep(poll);
        let Some(watch) = watch.upgrade() else {
            return;
        };
        let waiting = watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(_, since)| since.elapsed() > timeout)
            .map(|(what, since)| (what.clone(), since.elapsed()));
        if let Some((what, waited)) = waiting {
            eprintln!(
                "softprompt: {} rank {} of {}: {what} waited {:.0} s for the other ranks (more \
                 than the collective timeout of {:.0} s): a rank failed or hangs; aborting the \
                 job",
                engine.name(),
                engine.rank(),
                engine.size(),
                waited.as_secs_f64(),
                timeout.as_secs_f64()
            );
            engine.abort(WATCHDOG_EXIT_CODE);
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    //! The reductions on an in-process engine whose ranks are threads.
    use super::*;
    use std::sync::Barrier;

    /// Ranks as threads: each collective posts this rank's buffer to a shared board, waits
    /// for every rank, reads what it needs, and waits again before the board is reused.
    pub(crate) struct Threads {
        rank: usize,
        board: Arc<(Barrier, Mutex<Vec<Vec<f64>>>)>,
    }

    impl Threads {
        /// The `size` ranks of one job.
        pub(crate) fn job(size: usize) -> Vec<Threads> {
            let board = Arc::new((Barrier::new(size), Mutex::new(vec![Vec::new(); size])));
            (0..size)
                .map(|rank| Threads {
                    rank,
                    board: board.clone(),
                })
                .collect()
        }

        /// Every rank's `send`, in rank order.
        fn exchange(&self, send: Vec<f64>) -> Vec<Vec<f64>> {
            let (barrier, board) = &*self.board;
            board.lock().unwrap()[self.rank] = send;
            barrier.wait();
            let all = board.lock().unwrap().clone();
            barrier.wait();
            all
        }
    }

    impl Collective for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.board.1.lock().unwrap().len()
        }
        fn name(&self) -> &str {
            "threads"
        }
        fn all_to_all_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
            let chunk = send.len() / self.size();
            let all = self.exchange(send.iter().map(|&x| x as f64).collect());
            for (k, from) in all.iter().enumerate() {
                for j in 0..chunk {
                    recv[k * chunk + j] = from[self.rank * chunk + j] as f32;
                }
            }
            Ok(())
        }
        fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
            let all = self.exchange(send.iter().map(|&x| x as f64).collect());
            for (r, x) in recv.iter_mut().zip(all.concat()) {
                *r = x as f32;
            }
            Ok(())
        }
        fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
            recv.copy_from_slice(&self.exchange(send.to_vec()).concat());
            Ok(())
        }
        fn broadcast_f64(&self, root: usize, buf: &mut [f64]) -> Result<()> {
            let all = self.exchange(buf.to_vec());
            buf.copy_from_slice(&all[root]);
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.board.0.wait();
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort {code}")
        }
    }

    /// Runs `f` on each rank of a `size`-rank thread job; the results in rank order.
    pub(crate) fn on_ranks<T: Send + 'static>(
        size: usize,
        f: impl Fn(Parallel) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = Threads::job(size)
            .into_iter()
            .map(|engine| {
                let f = f.clone();
                std::thread::spawn(move || {
                    f(Parallel::new(Arc::new(engine), Duration::from_secs(60)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn shards_are_disjoint_contiguous_and_cover_the_batch() {
        for len in 0..12 {
            for size in 1..5 {
                let ranges: Vec<_> = (0..size).map(|r| shard_range(len, r, size)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[size - 1].end, len);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
        assert_eq!(shard_range(8, 1, 2), 4..8);
        assert_eq!(shard_range(5, 2, 3), 4..5);
    }

    /// The sum in rank order, bucket by bucket, equals the plain left-to-right f32 sum of the
    /// ranks' buffers bit for bit, on every rank, for lengths that do not divide evenly.
    #[test]
    fn all_reduce_adds_in_rank_order_on_every_rank() {
        let len = 1001;
        let value = |rank: usize, i: usize| ((rank * 7919 + i * 104729) % 1000) as f32 * 1e-3 + 0.1;
        for size in [2, 3] {
            let results = on_ranks(size, move |par| {
                let mut buf: Vec<f32> = (0..len).map(|i| value(par.rank(), i)).collect();
                par.all_reduce_sum_f32("test", &mut buf).unwrap();
                let mut scalars = vec![par.rank() as f64 + 0.5, 1.0];
                par.all_reduce_sum_f64("test", &mut scalars).unwrap();
                (buf, scalars)
            });
            let expected: Vec<f32> = (0..len)
                .map(|i| {
                    let mut s = value(0, i);
                    for r in 1..size {
                        s += value(r, i);
                    }
                    s
                })
                .collect();
            for (buf, scalars) in &results {
                assert!(buf.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()));
                let ranks: f64 = (0..size).map(|r| r as f64 + 0.5).sum();
                assert_eq!(scalars, &vec![ranks, size as f64]);
            }
        }
    }

    #[test]
    fn the_single_process_is_the_identity() {
        let par = Parallel::single();
        let mut buf = vec![1.5f32, -2.0];
        par.all_reduce_sum_f32("test", &mut buf).unwrap();
        assert_eq!(buf, vec![1.5, -2.0]);
        assert!(par.is_root() && par.size() == 1);
    }
}
