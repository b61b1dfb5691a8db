//! A frozen matrix kept in the encoding it was stored in, dequantised when a product runs.
//!
//! GGUF files store most matrices as blocks (Q4_0 .. Q8_0, Q2_K .. Q6_K, F16, BF16); turning
//! them into f32 at load multiplies their memory by 4-8 (SmolLM2's 98 MB Q4_1 file became
//! ~540 MB). A [`FrozenWeight::Stored`] matrix keeps the blocks; each product that needs f32
//! values dequantises the matrix (or a panel of its rows) right before it runs and drops the
//! copy after, with candle's own per-block routine (`GgmlType::to_float`), so the values, and
//! every result computed from them, equal what load-time dequantisation gave. Few-row
//! products without a gradient (decode steps) can run on the blocks directly
//! ([`FrozenWeight::quantized`], candle's quantised matmul).
//!
//! The type lives with the kernels (which read it) rather than with the layers (which own it):
//! kernels know nothing of models, and a weight is data to them.

use super::cpu::Result;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::Arc;

/// A frozen `[N, K]` matrix (nn.Linear layout; `[V, D]` for an embedding table).
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    /// A tensor: f32 (what the kernels read in place, and what model tuning's trainable
    /// variables are) or another float dtype read through [`FrozenWeight::to_f32`].
    Dense(Tensor),
    /// Rows of a matrix in its GGUF encoding (CPU), dequantised on use.
    Stored(StoredMatrix),
}

/// Rows `start .. start + rows` of a stored `[N_all, K]` matrix (a view: Phi-3's stacked
/// projections share one matrix).
#[derive(Clone)]
pub struct StoredMatrix {
    q: Arc<QTensor>,
    start: usize,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for StoredMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Stored[{:?}; rows {}..{} of {:?}]",
            self.q.dtype(),
            self.start,
            self.start + self.rows,
            self.q.shape().dims()
        )
    }
}

/// Rows dequantised per parallel task: small enough to spread a `[576, 576]` matrix over
/// the pool, large enough that the task overhead does not show.
const ROWS_PER_TASK: usize = 16;

impl FrozenWeight {
    /// A stored matrix, all its rows; it must be a 2-D CPU tensor whose rows are whole blocks
    /// (GGUF guarantees it for a file's matrices).
    pub fn stored(q: Arc<QTensor>) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        if !q.device().is_cpu() || cols % q.dtype().block_size() != 0 {
            candle_core::bail!(
                "stored weight {:?} {:?}: a CPU matrix of whole blocks is required",
                q.dtype(),
                q.shape()
            );
        }
        Ok(FrozenWeight::Stored(StoredMatrix {
            q,
            start: 0,
            rows,
            cols,
        }))
    }

    /// `(N, K)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(t) => t.dims2(),
            FrozenWeight::Stored(s) => Ok((s.rows, s.cols)),
        }
    }

    /// The tensor when the weight is a tensor (kernels read an f32 one in place).
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            FrozenWeight::Dense(t) => Some(t),
            FrozenWeight::Stored(_) => None,
        }
    }

    /// The GGUF block type when the weight is stored.
    pub fn stored_dtype(&self) -> Option<GgmlDType> {
        match self {
            FrozenWeight::Dense(_) => None,
            FrozenWeight::Stored(s) => Some(s.q.dtype()),
        }
    }

    /// Bytes the weight holds (a view counts its rows only).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Stored(s) => s.rows * s.row_bytes(),
        }
    }

    /// Output rows `start .. start + len` (a view, no copy).
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        match self {
            FrozenWeight::Dense(t) => Ok(FrozenWeight::Dense(t.narrow(0, start, len)?)),
            FrozenWeight::Stored(s) => {
                if start + len > s.rows {
                    candle_core::bail!("rows {start}..{} of a [{}, {}] weight", start + len, s.rows, s.cols);
                }
                Ok(FrozenWeight::Stored(StoredMatrix {
                    start: s.start + start,
                    rows: len,
                    ..s.clone()
                }))
            }
        }
    }

    /// The matrix as an f32 tensor: the tensor itself when it is one, else a fresh
    /// dequantised copy on the CPU (the caller drops it when its product is done).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => t.to_dtype(DType::F32),
            FrozenWeight::Stored(s) => {
                Tensor::from_vec(s.dequantize_rows(0, s.rows)?, (s.rows, s.cols), &Device::Cpu)
            }
        }
    }

    /// The matrix as f32 values `[N * K]`, row-major (a fresh copy).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self {
            FrozenWeight::Dense(t) => t.to_dtype(DType::F32)?.flatten_all()?.to_vec1(),
            FrozenWeight::Stored(s) => s.dequantize_rows(0, s.rows),
        }
    }

    /// Rows `ids` of the matrix as f32 `[len(ids), K]`, dequantising only those rows (an
    /// embedding lookup). An id past the last row is an error naming it.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (n, k) = self.dims2()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
            candle_core::bail!("row {bad} of a matrix with {n} rows");
        }
        match self {
            FrozenWeight::Dense(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
                t.index_select(&idx, 0)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
            }
            FrozenWeight::Stored(s) => {
                let mut out = vec![0f32; ids.len() * k];
                out.par_chunks_mut(k)
                    .zip(ids.par_iter())
                    .try_for_each(|(row, &i)| s.dequantize_into(i as usize, row))?;
                Ok(out)
            }
        }
    }

    /// The quantised blocks for candle's quantised matmul, when the weight is a whole stored
    /// matrix of a block type (not a row view, not F32/F16/BF16, which that matmul would
    /// dequantise anyway).
    pub fn quantized(&self) -> Option<&QTensor> {
        match self {
            FrozenWeight::Stored(s)
                if s.start == 0
                    && s.rows == s.q.shape().dims()[0]
                    && !matches!(s.q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) =>
            {
                Some(&s.q)
            }
            _ => None,
        }
    }
}

impl StoredMatrix {
    fn row_bytes(&self) -> usize {
        let dt = self.q.dtype();
        self.cols / dt.block_size() * dt.type_size()
    }

    /// Rows `first .. first + count` of the view as f32 `[count, K]`, dequantised in
    /// parallel panels of rows.
    fn dequantize_rows(&self, first: usize, count: usize) -> Result<Vec<f32>> {
        let k = self.cols;
        let mut out = vec![0f32; count * k];
        out.par_chunks_mut(ROWS_PER_TASK * k)
            .enumerate()
            .try_for_each(|(task, panel)| {
                let rows = panel.len() / k;
                self.dequantize_into(first + task * ROWS_PER_TASK, &mut panel[..rows * k])
            })?;
        Ok(out)
    }

    /// Rows from `row` (of the view) into `out` (whole rows).
    fn dequantize_into(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let k = self.cols;
        let count = out.len() / k;
        if count * k != out.len() || row + count > self.rows {
            candle_core::bail!("stored weight: rows {row}..{} of {}", row + count, self.rows);
        }
        let data = self.q.data()?;
        let rb = self.row_bytes();
        let from = (self.start + row) * rb;
        let bytes = data
            .get(from..from + count * rb)
            .ok_or_else(|| candle_core::Error::Msg("stored weight: rows past its data".into()))?;
        blocks_to_f32(self.q.dtype(), bytes, out)
    }
}

/// Decodes whole blocks of `dtype` in `bytes` into `out` with candle's routine for the type.
fn blocks_to_f32(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match dtype {
        GgmlDType::F32 => decode::<f32>(bytes, out),
        GgmlDType::F16 => decode::<f16>(bytes, out),
        GgmlDType::BF16 => decode::<bf16>(bytes, out),
        GgmlDType::Q4_0 => decode::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => decode::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => decode::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => decode::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => decode::<BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => decode::<BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => decode::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => decode::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => decode::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => decode::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => decode::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => decode::<BlockQ8K>(bytes, out),
    }
}

fn decode<T: GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let size = std::mem::size_of::<T>();
    let blocks = bytes.len() / size;
    if blocks * size != bytes.len()
        || blocks * T::BLCK_SIZE != out.len()
        || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0
    {
        candle_core::bail!(
            "stored weight: {} bytes of {:?} blocks for {} values",
            bytes.len(),
            T::DTYPE,
            out.len()
        );
    }
    // SAFETY: the bytes are candle's own `Vec<T>` storage (see `QTensor::data`), cut at whole
    // blocks; the length and alignment are checked above, and every block type is plain data.
    let xs = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), blocks) };
    T::to_float(xs, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block type: whole-matrix, row-view and gathered rows equal candle's own
    /// `QTensor::dequantize` bit for bit.
    #[test]
    fn dequantised_values_equal_candles() {
        let (n, k) = (40, 512);
        let x = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for dt in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = Arc::new(QTensor::quantize(&x, dt).unwrap());
            let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let w = FrozenWeight::stored(q).unwrap();
            let all: Vec<f32> = w.to_f32().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(all, want, "{dt:?}");
            let view: Vec<f32> = w.rows(3, 20).unwrap().to_f32().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(view, want[3 * k..23 * k], "{dt:?} rows");
            let got = w.gather_rows(&[7, 0, 39, 7]).unwrap();
            let rows: Vec<f32> = [7, 0, 39, 7].iter().flat_map(|&r| want[r * k..(r + 1) * k].to_vec()).collect();
            assert_eq!(got, rows, "{dt:?} gathered");
            assert!(w.gather_rows(&[40]).unwrap_err().to_string().contains("row 40"));
        }
    }
}
