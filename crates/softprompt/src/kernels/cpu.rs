//! CPU buffer access for the kernels: contiguous f32 data of a storage or a tensor, the one
//! helper through which parallel tasks write disjoint parts of one output, and the one
//! parallelism setting (rayon's global pool, which the `gemm` crate's products use too).

use candle_core::{CpuStorage, Layout, Shape, Storage, StorageRef, Tensor};
use rayon::prelude::*;

pub(crate) type Result<T> = candle_core::Result<T>;

/// Below this many elements an element-wise op runs on the calling thread.
const PAR_MIN: usize = 16 * 1024;

/// Rows per rayon task below which splitting does not pay.
pub(crate) const MIN_ROWS: usize = 8;

/// Element-wise chunk handed to one rayon task.
pub(crate) const CHUNK: usize = 4096;

/// How the `gemm` crate splits a large product: over the threads of rayon's pool.
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// The contiguous f32 data of a CPU operand.
pub(crate) fn data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

/// The contiguous f32 data of `N` CPU operands of the op `op`.
pub(crate) fn operands<'a, const N: usize>(
    op: &str,
    storages: [(&'a CpuStorage, &Layout); N],
) -> Result<[&'a [f32]; N]> {
    let mut out = [&[][..]; N];
    for (o, (s, l)) in out.iter_mut().zip(storages) {
        *o = data(s, l, op)?;
    }
    Ok(out)
}

/// A read lock on a tensor's storage, for kernels that read operands they did not receive
/// through candle (weights held by an op, saved inputs in a backward).
pub(crate) struct ReadLock<'a>(StorageRef<'a>, &'a Layout);

impl<'a> ReadLock<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Self {
        let (s, l) = t.storage_and_layout();
        ReadLock(s, l)
    }

    /// The contiguous f32 data of the locked tensor.
    pub(crate) fn f32(&self) -> Result<&[f32]> {
        match &*self.0 {
            Storage::Cpu(c) => data(c, self.1, "kernel operand"),
            _ => candle_core::bail!("kernel operand: expected a CPU tensor"),
        }
    }
}

/// A backward pass computed directly on the CPU data of `inputs` (f32 tensors; made
/// contiguous): `f` gets their data and returns the gradient, shaped like `inputs[0]`.
/// Nothing is recorded for autograd.
pub(crate) fn backward<const N: usize>(
    op: &str,
    inputs: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let owned = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let locks: Vec<ReadLock> = owned.iter().map(ReadLock::new).collect();
    let mut data = [&[][..]; N];
    for (d, lock) in data.iter_mut().zip(&locks) {
        *d = lock.f32()?;
    }
    let like = &owned[0];
    let out = f(data)?;
    check_len(op, out.len(), like.elem_count())?;
    Tensor::from_vec(out, like.shape(), like.device())
}

/// An output buffer that several tasks write at disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: users write disjoint elements from different tasks (see each call site).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(v: &mut [f32]) -> Self {
        SharedOut {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first element's address.
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.ptr
    }

    /// `len` floats from `start`.
    ///
    /// # Safety
    /// No other reference to these elements may exist while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> Result<&mut [f32]> {
        if start + len > self.len {
            candle_core::bail!("kernel output: slice {start}+{len} out of {}", self.len);
        }
        Ok(std::slice::from_raw_parts_mut(self.ptr.add(start), len))
    }
}

/// Builds `total` floats in chunks of `chunk` (the last one may be shorter), the chunk
/// starting at `s` written by `f(s, chunk)`; in parallel when `work` (elements touched) is
/// large.
pub(crate) fn fill(
    total: usize,
    chunk: usize,
    work: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Result<Vec<f32>> {
    let mut out = vec![0f32; total];
    let chunk = chunk.max(1);
    if work >= PAR_MIN && total > chunk {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, y)| f(c * chunk, y));
    } else {
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, y)| f(c * chunk, y));
    }
    Ok(out)
}

/// `n` rows of `len` floats, row `i` written by `f(i, row)`.
pub(crate) fn rows(n: usize, len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Result<Vec<f32>> {
    fill(n * len, len, n * len, |s, row| f(s / len.max(1), row))
}

/// `n` floats written in chunks by `f(start, chunk)`.
pub(crate) fn map_flat(n: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Result<Vec<f32>> {
    fill(n, CHUNK, n, f)
}

/// `(rows, D)` of an operand `[.., D]`.
pub(crate) fn last_dim(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.dims();
    match dims.last() {
        Some(&d) if d > 0 => Ok((l.shape().elem_count() / d, d)),
        _ => candle_core::bail!("fused op: empty last dimension in {dims:?}"),
    }
}

pub(crate) fn f32_out(v: Vec<f32>, l: &Layout) -> (CpuStorage, Shape) {
    (CpuStorage::F32(v), l.shape().clone())
}

pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        candle_core::bail!("{what}: expected {want} elements, got {got}");
    }
    Ok(())
}

/// The error of a lock whose holder panicked.
pub(crate) fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused block: a thread panicked while holding saved activations".into())
}
