//! The MPI engine of data-parallel training (feature `mpi`): the [`Collective`] operations
//! over `MPI_COMM_WORLD` of the system's MPI library (Open MPI, MPICH), through the `mpi`
//! crate. A program calls [`init`] once, keeps the returned [`MpiRuntime`] alive until it
//! ends (dropping it finalizes MPI), and hands [`MpiRuntime::parallel`] to its
//! [`TrainConfig`](super::TrainConfig).

use crate::train::parallel::{Collective, Parallel};
use crate::{bail, Error, Result};
use mpi::collective::{CommunicatorCollectives, Root};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;
use std::sync::Arc;
use std::time::Duration;

/// MPI, initialised; dropping it calls `MPI_Finalize`.
pub struct MpiRuntime {
    // Field order: the communicator's users go before the universe that finalizes MPI.
    world: Arc<MpiWorld>,
    _universe: Universe,
}

/// Whether this process was started by an MPI launcher (`mpirun`/`mpiexec` of Open MPI or
/// MPICH, Slurm's `srun` with PMI/PMIx), from the variables they set.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Initialises MPI (asking for `MPI_THREAD_MULTIPLE`, so the watchdog thread may call
/// `MPI_Abort` while the main thread waits in a collective).
pub fn init() -> Result<MpiRuntime> {
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        bail!("MPI is already initialised in this process");
    };
    if threading != Threading::Multiple {
        tracing::warn!(
            "the MPI library gives {threading:?} threading, not Multiple: the collective \
             watchdog's abort may not reach the other ranks"
        );
    }
    let world = universe.world();
    let (rank, size) = (world.rank(), world.size());
    let (Ok(rank), Ok(size)) = (usize::try_from(rank), usize::try_from(size)) else {
        bail!("MPI gave a negative rank ({rank}) or size ({size})");
    };
    Ok(MpiRuntime {
        world: Arc::new(MpiWorld { world, rank, size }),
        _universe: universe,
    })
}

impl MpiRuntime {
    pub fn rank(&self) -> usize {
        self.world.rank
    }

    pub fn size(&self) -> usize {
        self.world.size
    }

    /// The collective of every rank, with a watchdog of `timeout` per collective.
    pub fn parallel(&self, timeout: Duration) -> Parallel {
        Parallel::new(self.world.clone(), timeout)
    }

    /// The engine itself, for the NCCL engine's bootstrap and host-side operations.
    #[cfg(feature = "nccl")]
    pub(crate) fn world(&self) -> Arc<MpiWorld> {
        self.world.clone()
    }
}

/// `MPI_COMM_WORLD`.
pub(crate) struct MpiWorld {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
}

// SAFETY: the world communicator is a process-wide handle that MPI lets any thread use when it
// was initialised with MPI_THREAD_MULTIPLE (asked for in `init`); the step loop calls the
// collectives from one thread, and the watchdog thread only calls MPI_Abort.
unsafe impl Send for MpiWorld {}
// SAFETY: as for Send.
unsafe impl Sync for MpiWorld {}

impl MpiWorld {
    /// `buf` of rank 0 on every rank (NCCL's unique id).
    #[cfg(feature = "nccl")]
    pub(crate) fn broadcast_bytes(&self, buf: &mut [u8]) -> Result<()> {
        self.world.process_at_rank(0).broadcast_into(buf);
        Ok(())
    }

    fn check_len(&self, what: &str, send: usize, recv: usize) -> Result<()> {
        if recv != send * self.size {
            return Err(Error::invalid(format!(
                "MPI {what}: {recv} values to receive for {send} sent by each of {} ranks",
                self.size
            )));
        }
        Ok(())
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn name(&self) -> &str {
        "MPI"
    }
    fn all_to_all_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if send.len() != recv.len() || !send.len().is_multiple_of(self.size) {
            bail!(
                "MPI all-to-all: {} values sent, {} received, for {} ranks",
                send.len(),
                recv.len(),
                self.size
            );
        }
        self.world.all_to_all_into(send, recv);
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.check_len("all-gather", send.len(), recv.len())?;
        self.world.all_gather_into(send, recv);
        Ok(())
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        self.check_len("all-gather", send.len(), recv.len())?;
        self.world.all_gather_into(send, recv);
        Ok(())
    }
    fn broadcast_f64(&self, root: usize, buf: &mut [f64]) -> Result<()> {
        let Ok(root) = i32::try_from(root) else {
            bail!("MPI broadcast: no rank {root}");
        };
        self.world.process_at_rank(root).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
