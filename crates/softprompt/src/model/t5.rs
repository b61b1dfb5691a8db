//! STUB: being written.
use super::{Seq2SeqLm, ModelInfo};
use crate::load::Weights;
use crate::Result;

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Config {}

pub struct T5 {
    info: ModelInfo,
}

impl T5 {
    pub fn new(_cfg: &Config, _w: &Weights, _name: String) -> Result<Self> {
        crate::bail!("t5: not implemented yet")
    }
}
impl Seq2SeqLm for T5 {
    fn info(&self) -> &ModelInfo { &self.info }
    fn embed(&self, _ids: &candle_core::Tensor) -> Result<candle_core::Tensor> { crate::bail!("todo") }
    fn encode(&self, _e: &candle_core::Tensor, _m: &candle_core::Tensor) -> Result<candle_core::Tensor> { crate::bail!("todo") }
    fn decode(&self, _d: &candle_core::Tensor, _e: &candle_core::Tensor, _m: &candle_core::Tensor, _c: Option<&mut super::KvCache>, _a: super::LogitsAt) -> Result<candle_core::Tensor> { crate::bail!("todo") }
    fn hidden_states(&self, _e: &candle_core::Tensor, _m: &candle_core::Tensor, _d: &candle_core::Tensor) -> Result<(Vec<candle_core::Tensor>, Vec<candle_core::Tensor>)> { crate::bail!("todo") }
}
