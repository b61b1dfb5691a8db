//! The NCCL engine of data-parallel training (feature `nccl`): one rank per GPU, the f32
//! exchanges of the gradient reduction (all-to-all and all-gather, see
//! [`super::parallel`]) run by NCCL between the GPUs, over NVLink/PCIe or the network. The
//! ranks are started and numbered by MPI (`mpirun`, `srun`), which also hands NCCL's unique id
//! from rank 0 to the others and carries the few `f64` sums (losses, token counts, dev scores).
//!
//! cudarc loads libcuda and libnccl when [`init`] runs, so this builds on a machine without
//! CUDA. The buffers are host slices copied to the rank's GPU and back: the gradients of a
//! CPU-built binary live on the host, and a `cuda` build reads them back for the optimizer's
//! checks anyway; the exchange itself is on the device.

use crate::train::mpi::{MpiRuntime, MpiWorld};
use crate::train::parallel::{Collective, Parallel};
use crate::{bail, Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{group_end, group_start, Comm, Id};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// The ranks of `mpi`, exchanging gradients with NCCL on GPU `ordinal` of this node (usually
/// the rank's local rank, `OMPI_COMM_WORLD_LOCAL_RANK` or `SLURM_LOCALID`).
pub fn init(mpi: &MpiRuntime, ordinal: usize, timeout: Duration) -> Result<Parallel> {
    let world = mpi.world();
    let cuda = |e: cudarc::driver::DriverError| {
        Error::invalid(format!("CUDA device {ordinal} for NCCL: {e:?}"))
    };
    let ctx = CudaContext::new(ordinal).map_err(cuda)?;
    let stream = ctx.default_stream();
    // Rank 0 makes the id; MPI carries it to every rank.
    let mut id_bytes = [0u8; ID_BYTES];
    if world.rank() == 0 {
        let id = Id::new().map_err(|e| nccl_error("making the unique id", e))?;
        for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
            *b = *c as u8;
        }
    }
    world.broadcast_bytes(&mut id_bytes)?;
    let mut internal = [0 as std::ffi::c_char; ID_BYTES];
    for (c, b) in internal.iter_mut().zip(id_bytes) {
        *c = b as std::ffi::c_char;
    }
    let comm = Comm::from_rank(
        stream.clone(),
        world.rank(),
        world.size(),
        Id::uninit(internal),
    )
    .map_err(|e| nccl_error("joining the communicator", e))?;
    Ok(Parallel::new(
        Arc::new(Nccl {
            world,
            comm,
            stream,
        }),
        timeout,
    ))
}

fn nccl_error(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::invalid(format!("NCCL {what}: {e:?}"))
}

fn driver_error(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::invalid(format!("CUDA {what}: {e:?}"))
}

/// NCCL for the f32 buffers, MPI for the rest.
struct Nccl {
    world: Arc<MpiWorld>,
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator is used by the thread running the step loop only (the watchdog
// thread calls MPI_Abort through `world`, never NCCL).
unsafe impl Send for Nccl {}
// SAFETY: as for Send.
unsafe impl Sync for Nccl {}

impl Nccl {
    /// `send` copied to the device, and a zeroed device buffer of `recv_len` values.
    fn upload(&self, send: &[f32], recv_len: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let device_send = self
            .stream
            .clone_htod(send)
            .map_err(|e| driver_error("copy to the device", e))?;
        let device_recv = self
            .stream
            .alloc_zeros::<f32>(recv_len)
            .map_err(|e| driver_error("allocation", e))?;
        Ok((device_send, device_recv))
    }

    /// The device buffer copied back into `recv`.
    fn download(&self, device: &CudaSlice<f32>, recv: &mut [f32]) -> Result<()> {
        let host = self
            .stream
            .clone_dtoh(device)
            .map_err(|e| driver_error("copy from the device", e))?;
        recv.copy_from_slice(&host);
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.world.rank()
    }
    fn size(&self) -> usize {
        self.world.size()
    }
    fn name(&self) -> &str {
        "NCCL"
    }
    fn all_to_all_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let size = self.size();
        if send.len() != recv.len() || !send.len().is_multiple_of(size) {
            bail!("NCCL all-to-all: {} values sent, {} received", send.len(), recv.len());
        }
        let chunk = send.len() / size;
        let (device_send, mut device_recv) = self.upload(send, recv.len())?;
        // NCCL has no all-to-all: one grouped send and receive per peer.
        group_start().map_err(|e| nccl_error("group start", e))?;
        for peer in 0..size {
            let range = peer * chunk..(peer + 1) * chunk;
            let (Some(out), Ok(to)) = (device_send.try_slice(range.clone()), i32::try_from(peer))
            else {
                bail!("NCCL all-to-all: no chunk for rank {peer}");
            };
            self.comm
                .send(&out, to)
                .map_err(|e| nccl_error("send", e))?;
            let Some(mut into) = device_recv.try_slice_mut(range) else {
                bail!("NCCL all-to-all: no chunk for rank {peer}");
            };
            self.comm
                .recv(&mut into, to)
                .map_err(|e| nccl_error("receive", e))?;
        }
        group_end().map_err(|e| nccl_error("group end", e))?;
        self.download(&device_recv, recv)
    }
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if recv.len() != send.len() * self.size() {
            bail!("NCCL all-gather: {} values to receive for {} sent", recv.len(), send.len());
        }
        let (device_send, mut device_recv) = self.upload(send, recv.len())?;
        self.comm
            .all_gather(&device_send, &mut device_recv)
            .map_err(|e| nccl_error("all-gather", e))?;
        self.download(&device_recv, recv)
    }
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        self.world.all_gather_f64(send, recv)
    }
    fn broadcast_f64(&self, root: usize, buf: &mut [f64]) -> Result<()> {
        self.world.broadcast_f64(root, buf)
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
