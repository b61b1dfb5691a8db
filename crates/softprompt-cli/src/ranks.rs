//! The ranks of a data-parallel `softprompt train` (docs/distributed.md): `--parallel` and
//! `--collective-timeout`, MPI's start and end, the GPU of each rank, and the job's abort
//! when one rank fails.

use anyhow::Result;
use candle_core::Device;
use clap::{Args, ValueEnum};
use softprompt::train::Parallel;

/// How the ranks of a run exchange gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ParallelKind {
    /// MPI when started by an MPI launcher (mpirun, mpiexec, srun) and built with the `mpi`
    /// feature; otherwise one process.
    Auto,
    /// One process.
    None,
    /// MPI ranks (feature `mpi`).
    Mpi,
    /// MPI ranks, one per GPU, gradients exchanged by NCCL (feature `nccl`).
    Nccl,
}

#[derive(Args, Clone, Debug)]
pub struct ParallelArgs {
    /// Data parallelism: each rank computes its share of every --batch-size batch (which stays
    /// the global batch); rank 0 writes the outputs.
    #[arg(long, value_enum, default_value_t = ParallelKind::Auto)]
    pub parallel: ParallelKind,
    /// Seconds a rank waits in one collective operation before it aborts the whole job (a
    /// rank that failed or hangs); it must exceed the longest imbalance between ranks, e.g.
    /// rank 0 writing a checkpoint.
    #[arg(long, default_value_t = 300.0)]
    pub collective_timeout: f64,
}

/// This process's rank, with MPI kept initialised while it lives.
pub struct Ranks {
    pub parallel: Parallel,
    /// The GPU of this rank on its node (its local rank).
    local_rank: usize,
    #[cfg(feature = "mpi")]
    _mpi: Option<softprompt::train::mpi::MpiRuntime>,
}

impl Ranks {
    /// Starts the ranks `args` asks for.
    pub fn start(args: &ParallelArgs) -> Result<Ranks> {
        if !(args.collective_timeout > 0.0 && args.collective_timeout.is_finite()) {
            anyhow::bail!(
                "--collective-timeout {}: give a positive number of seconds",
                args.collective_timeout
            );
        }
        let timeout = std::time::Duration::from_secs_f64(args.collective_timeout);
        let _ = timeout;
        match args.parallel {
            ParallelKind::None => Ok(Ranks::single()),
            #[cfg(feature = "mpi")]
            ParallelKind::Auto if !softprompt::train::mpi::launched_by_mpi() => {
                Ok(Ranks::single())
            }
            #[cfg(feature = "mpi")]
            ParallelKind::Auto | ParallelKind::Mpi => {
                let mpi = softprompt::train::mpi::init()?;
                Ok(Ranks {
                    parallel: mpi.parallel(timeout),
                    local_rank: local_rank().unwrap_or(mpi.rank()),
                    _mpi: Some(mpi),
                })
            }
            #[cfg(not(feature = "mpi"))]
            ParallelKind::Auto => Ok(Ranks::single()),
            #[cfg(not(feature = "mpi"))]
            ParallelKind::Mpi => anyhow::bail!(
                "--parallel mpi: this softprompt was built without MPI (cargo build --features mpi)"
            ),
            #[cfg(feature = "nccl")]
            ParallelKind::Nccl => {
                let mpi = softprompt::train::mpi::init()?;
                let local_rank = local_rank().unwrap_or(mpi.rank());
                Ok(Ranks {
                    parallel: softprompt::train::nccl::init(&mpi, local_rank, timeout)?,
                    local_rank,
                    _mpi: Some(mpi),
                })
            }
            #[cfg(not(feature = "nccl"))]
            ParallelKind::Nccl => anyhow::bail!(
                "--parallel nccl: this softprompt was built without NCCL (cargo build --features nccl)"
            ),
        }
    }

    fn single() -> Ranks {
        Ranks {
            parallel: Parallel::single(),
            local_rank: 0,
            #[cfg(feature = "mpi")]
            _mpi: None,
        }
    }

    pub fn is_root(&self) -> bool {
        self.parallel.is_root()
    }

    /// The device of this rank: its local rank's GPU in a CUDA build, else the CPU.
    pub fn device(&self) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            if let Ok(d) = Device::new_cuda(self.local_rank) {
                return Ok(d);
            }
        }
        let _ = self.local_rank;
        Ok(Device::Cpu)
    }

    /// With several ranks, a failed rank ends the whole job (MPI_Abort) after printing its
    /// error, so the others do not wait for it; one process just returns the error.
    pub fn finish(&self, result: Result<()>) -> Result<()> {
        if let Err(e) = &result {
            if self.parallel.size() > 1 {
                eprintln!(
                    "error: rank {} of {}: {e:#}\nsoftprompt: aborting every rank of the job",
                    self.parallel.rank(),
                    self.parallel.size()
                );
                self.parallel.abort(1);
            }
        }
        result
    }
}

/// The rank on this node, from the launcher's variables (Open MPI, Slurm, MPICH).
#[cfg(feature = "mpi")]
fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}
