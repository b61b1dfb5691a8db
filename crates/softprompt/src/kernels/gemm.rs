//! One strided sgemm helper over the kernel candle's CPU matmul uses (the `gemm` crate), and
//! the small row helpers the block kernels build on. Strides let one product read a head
//! slice, a transposed weight or a bias-initialised output in place.

use super::cpu::{gemm_parallelism, ReadLock, Result, SharedOut, MIN_ROWS};
use super::weight::FrozenWeight;
use candle_core::Tensor;
use rayon::prelude::*;

/// Where a matrix sits in a flat buffer: element `(i, j)` at `off + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct MatLayout {
    off: usize,
    rs: usize,
    cs: usize,
}

impl MatLayout {
    /// Row-major `[.., cols]` from `off`.
    pub(crate) fn rows(off: usize, cols: usize) -> Self {
        MatLayout {
            off,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of row-major `[.., cols]` from `off`.
    pub(crate) fn t(off: usize, cols: usize) -> Self {
        MatLayout {
            off,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether an `r x c` matrix at this place lies inside a buffer of `len` floats.
    fn fits(&self, r: usize, c: usize, len: usize) -> bool {
        r == 0 || c == 0 || self.off + (r - 1) * self.rs + (c - 1) * self.cs < len
    }
}

/// A matrix operand: its buffer and where it sits in it.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a>(pub &'a [f32], pub MatLayout);

/// How a product runs: on the calling thread (inside a parallel task) or split over the
/// pool (see [`super::cpu::gemm_parallelism`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    Calling,
    Pool,
}

/// `c = a @ b` (or `c += a @ b` with `acc`) for `a [m, k]`, `b [k, n]`, `c [m, n]` placed at
/// `cm` in the output buffer.
///
/// # Safety
/// No other thread may access the elements of `c` this product writes while it runs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_shared(
    c: SharedOut,
    cm: MatLayout,
    acc: bool,
    MatRef(a, am): MatRef,
    MatRef(b, bm): MatRef,
    (m, n, k): (usize, usize, usize),
    threads: Threads,
) -> Result<()> {
    if !(cm.fits(m, n, c.len()) && am.fits(m, k, a.len()) && bm.fits(k, n, b.len())) {
        candle_core::bail!("fused block: matmul operand out of range ({m}x{k} @ {k}x{n})");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let par = match threads {
        Threads::Calling => gemm::Parallelism::None,
        Threads::Pool => gemm_parallelism(),
    };
    gemm::gemm(
        m,
        n,
        k,
        c.ptr().add(cm.off),
        cm.cs as isize,
        cm.rs as isize,
        acc,
        a.as_ptr().add(am.off),
        am.cs as isize,
        am.rs as isize,
        b.as_ptr().add(bm.off),
        bm.cs as isize,
        bm.rs as isize,
        if acc { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par,
    );
    Ok(())
}

/// [`gemm_shared`] on an exclusively borrowed output, all threads on the one product.
pub(crate) fn gemm(
    c: &mut [f32],
    cm: MatLayout,
    acc: bool,
    a: MatRef,
    b: MatRef,
    mnk: (usize, usize, usize),
) -> Result<()> {
    // SAFETY: `c` is borrowed mutably, nothing else can touch it.
    unsafe { gemm_shared(SharedOut::new(c), cm, acc, a, b, mnk, Threads::Pool) }
}

/// `acc + x @ w` for row-major `x [R, N]` and `w [N, K]` (an input gradient through the
/// frozen weight `w` of a projection `[N, K]`): `acc [R, K]` is added to, or written when
/// `add` is false.
pub(crate) fn input_grad(
    acc: &mut [f32],
    add: bool,
    x: &[f32],
    w: &[f32],
    (r, n, k): (usize, usize, usize),
) -> Result<()> {
    gemm(
        acc,
        MatLayout::rows(0, k),
        add,
        MatRef(x, MatLayout::rows(0, n)),
        MatRef(w, MatLayout::rows(0, k)),
        (r, k, n),
    )
}

/// A frozen projection `x @ w^T + b` as the block kernels take it: `w [N, K]` (nn.Linear
/// layout; a tensor or stored blocks), `b [N]`.
#[derive(Clone, Debug)]
pub(crate) struct ProjWeights {
    pub w: FrozenWeight,
    pub b: Option<Tensor>,
}

impl ProjWeights {
    /// `(N, K)`, checking the bias length.
    pub(crate) fn dims(&self, what: &str) -> Result<(usize, usize)> {
        let (n, k) = self.w.dims2()?;
        if let Some(b) = &self.b {
            if b.dims() != [n] {
                candle_core::bail!("{what}: bias {:?} for weight [{n}, {k}]", b.dims());
            }
        }
        Ok((n, k))
    }

    /// The tensors the kernels read in place (a stored weight is not one: it is frozen by
    /// construction and read through its own decoding).
    pub(crate) fn tensors<'a>(&'a self, out: &mut Vec<&'a Tensor>) {
        out.extend(self.w.as_dense());
        out.extend(&self.b);
    }

    /// Read access to the weight and bias, for [`ProjLock::data`]: a read lock on a tensor,
    /// or a stored weight dequantised now into a buffer the lock owns (dropped with it, so
    /// no f32 copy outlives the product that needed it).
    pub(crate) fn lock(&self) -> Result<ProjLock<'_>> {
        let w = match &self.w {
            FrozenWeight::Dense(t) => WeightData::Locked(ReadLock::new(t)),
            stored => WeightData::Decoded(stored.to_f32_vec()?),
        };
        Ok(ProjLock {
            w,
            b: self.b.as_ref().map(ReadLock::new),
        })
    }
}

/// A weight's f32 values for the duration of a product.
enum WeightData<'a> {
    Locked(ReadLock<'a>),
    Decoded(Vec<f32>),
}

pub(crate) struct ProjLock<'a> {
    w: WeightData<'a>,
    b: Option<ReadLock<'a>>,
}

impl ProjLock<'_> {
    /// The weight's data `[N, K]`.
    pub(crate) fn w(&self) -> Result<&[f32]> {
        match &self.w {
            WeightData::Locked(l) => l.f32(),
            WeightData::Decoded(v) => Ok(v),
        }
    }

    /// The bias's data `[N]`, when there is one.
    pub(crate) fn b(&self) -> Result<Option<&[f32]>> {
        self.b.as_ref().map(|b| b.f32()).transpose()
    }
}

/// `x [R, K] @ w^T (+ b)` -> `[R, N]` for `w [N, K]`.
pub(crate) fn project(x: &[f32], r: usize, k: usize, p: &ProjLock) -> Result<Vec<f32>> {
    let (w, b) = (p.w()?, p.b()?);
    let n = w.len() / k;
    let mut y = match b {
        Some(b) => b.repeat(r),
        None => vec![0f32; r * n],
    };
    add_product_t(&mut y, x, w, b.is_some(), (r, n, k))?;
    Ok(y)
}

/// `y (+)= x [R, K] @ w^T` for `w [N, K]`, `y [R, N]`.
pub(crate) fn add_product_t(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    acc: bool,
    (r, n, k): (usize, usize, usize),
) -> Result<()> {
    gemm(
        y,
        MatLayout::rows(0, n),
        acc,
        MatRef(x, MatLayout::rows(0, k)),
        MatRef(w, MatLayout::t(0, k)),
        (r, n, k),
    )
}

/// `b` in each of `r` rows (zeros without one): the start of a branch output `[R, D]` that
/// has no residual.
pub(crate) fn bias_rows(r: usize, d: usize, b: Option<&[f32]>) -> Vec<f32> {
    match b {
        Some(b) => b.repeat(r),
        None => vec![0f32; r * d],
    }
}

/// `x (+ b)` row by row: the start of a residual output `[R, D]`.
pub(crate) fn residual(x: &[f32], d: usize, b: Option<&[f32]>) -> Vec<f32> {
    let mut y = x.to_vec();
    if let Some(b) = b {
        y.par_chunks_mut(d).with_min_len(MIN_ROWS).for_each(|row| {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        });
    }
    y
}

/// `sum(a * b)`.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// `y += alpha * x`.
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// Rows `rows` of `x [.., D]` -> `[M, D]`.
pub(crate) fn gather(x: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}
