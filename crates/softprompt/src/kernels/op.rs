//! The one implementation of candle's `CustomOp1/2/3` for the element-wise and row-wise ops:
//! each is a [`CpuKernel`] over `N` operands (a forward on their CPU storages, a backward on
//! the tensors), and [`Fused`] turns it into the candle op of matching arity, so no op spells
//! out candle's per-arity signatures. The block ops (`attention`, `feed_forward`) and
//! `frozen_matmul` implement `CustomOp1/2` directly: they keep state between forward and
//! backward, or have GPU forwards.

use super::cpu::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

/// One CPU storage with its layout, as candle hands an operand to a custom op.
pub(crate) type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// A CPU op over `N` operands with a hand-written backward.
pub(crate) trait CpuKernel<const N: usize> {
    /// candle's op name (shown in errors).
    const NAME: &'static str;

    /// The output of the op on the CPU data of its operands.
    fn forward(&self, operands: [Operand<'_>; N]) -> Result<(CpuStorage, Shape)>;

    /// The gradients of the operands (`None` where none is needed), from the operands, the
    /// output `y` and its gradient `dy`. By default the op has none (a backward's own op).
    fn backward(
        &self,
        inputs: [&Tensor; N],
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let _ = (inputs, y, dy);
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// A [`CpuKernel`] as a candle custom op (a local wrapper: candle's traits cannot be
/// implemented for every kernel at once).
pub(crate) struct Fused<K>(pub K);

impl<K: CpuKernel<1>> CustomOp1 for Fused<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.forward([(s, l)])
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let [dx] = self.0.backward([x], y, dy)?;
        Ok(dx)
    }
}

impl<K: CpuKernel<2>> CustomOp2 for Fused<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward([(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.0.backward([a, b], y, dy)?;
        Ok((da, db))
    }
}

impl<K: CpuKernel<3>> CustomOp3 for Fused<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward([(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.0.backward([a, b, c], y, dy)?;
        Ok((da, db, dc))
    }
}
