//! STUB: being written.
use super::{CausalLm, ModelInfo};
use crate::load::Weights;
use crate::Result;

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {}

pub struct Gpt2 {
    info: ModelInfo,
}

impl Gpt2 {
    pub fn new(_cfg: &Config, _w: &Weights, _name: String) -> Result<Self> {
        crate::bail!("gpt2: not implemented yet")
    }
}
impl CausalLm for Gpt2 {
    fn info(&self) -> &ModelInfo { &self.info }
    fn embed(&self, _ids: &candle_core::Tensor) -> Result<candle_core::Tensor> { crate::bail!("todo") }
    fn forward(&self, _e: &candle_core::Tensor, _m: &candle_core::Tensor, _c: Option<&mut super::KvCache>, _a: super::LogitsAt) -> Result<candle_core::Tensor> { crate::bail!("todo") }
    fn hidden_states(&self, _e: &candle_core::Tensor, _m: &candle_core::Tensor) -> Result<Vec<candle_core::Tensor>> { crate::bail!("todo") }
}
