//! P-tuning (Liu et al. 2021, "GPT Understands, Too"): the prompt is not trained directly but
//! produced by a small network, `P = f(E)`, from trainable input embeddings `E [N, D]`.
//!
//! The reparameterisations follow PEFT's `PromptEncoder`:
//! * MLP: `Linear(D, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, D)`;
//! * LSTM: a 2-layer bidirectional LSTM (hidden size `H`) over the `N` positions, then
//!   `Linear(2H, 2H) -> ReLU -> Linear(2H, D)`.
//!
//! Every parameter is a [`Var`]; the forward pass uses only differentiable candle ops.

use crate::prompt::init::Rng;
use crate::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};

/// Seed stream of the encoder's weight initialisation.
const STREAM_ENCODER: u64 = 0x51a3_0c77_e2d9_148b;
/// LSTM layers (PEFT's default `encoder_num_layers`).
const LSTM_LAYERS: usize = 2;

/// Which reparameterisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum EncoderKind {
    /// Linear-ReLU-Linear-ReLU-Linear (PEFT's MLP).
    Mlp,
    /// A 2-layer bidirectional LSTM followed by an MLP (PEFT's LSTM).
    Lstm,
}

impl EncoderKind {
    pub fn name(&self) -> &'static str {
        match self {
            EncoderKind::Mlp => "mlp",
            EncoderKind::Lstm => "lstm",
        }
    }
}

impl std::str::FromStr for EncoderKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mlp" | "MLP" => Ok(EncoderKind::Mlp),
            "lstm" | "LSTM" => Ok(EncoderKind::Lstm),
            other => bail!("unknown prompt encoder `{other}` (expected mlp or lstm)"),
        }
    }
}

/// `y = x W^T + b`.
struct Linear {
    w: Var, // [out, in]
    b: Var, // [out]
}

impl Linear {
    /// PyTorch's default init: uniform in `±1/sqrt(in)` for both weight and bias.
    fn new(n_in: usize, n_out: usize, rng: &mut Rng, device: &Device) -> Result<Self> {
        Ok(Linear {
            w: uniform_var(&[n_out, n_in], n_in, rng, device)?,
            b: uniform_var(&[n_out], n_in, rng, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())?)
    }
}

/// One direction of one LSTM layer (PyTorch's gate order i, f, g, o).
struct LstmCell {
    w_ih: Var, // [4H, in]
    w_hh: Var, // [4H, H]
    b_ih: Var, // [4H]
    b_hh: Var, // [4H]
}

impl LstmCell {
    fn new(n_in: usize, h: usize, rng: &mut Rng, device: &Device) -> Result<Self> {
        Ok(LstmCell {
            w_ih: uniform_var(&[4 * h, n_in], h, rng, device)?,
            w_hh: uniform_var(&[4 * h, h], h, rng, device)?,
            b_ih: uniform_var(&[4 * h], h, rng, device)?,
            b_hh: uniform_var(&[4 * h], h, rng, device)?,
        })
    }

    /// Runs over `x [N, in]` in order (or reversed), returning the hidden states `[N, H]` in
    /// position order.
    fn run(&self, x: &Tensor, reverse: bool) -> Result<Tensor> {
        let n = x.dim(0)?;
        let h_size = self.w_hh.dim(1)?;
        // Input projections of all positions at once.
        let xi = x
            .matmul(&self.w_ih.as_tensor().t()?)?
            .broadcast_add(self.b_ih.as_tensor())?
            .broadcast_add(self.b_hh.as_tensor())?; // [N, 4H]
        let w_hh_t = self.w_hh.as_tensor().t()?; // [H, 4H]
        let mut h = Tensor::zeros((1, h_size), DType::F32, x.device())?;
        let mut c = h.clone();
        let mut outs: Vec<Tensor> = vec![h.clone(); n];
        let order: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in order {
            let gates = (xi.narrow(0, t, 1)? + h.matmul(&w_hh_t)?)?; // [1, 4H]
            let i = sigmoid(&gates.narrow(1, 0, h_size)?)?;
            let f = sigmoid(&gates.narrow(1, h_size, h_size)?)?;
            let g = gates.narrow(1, 2 * h_size, h_size)?.tanh()?;
            let o = sigmoid(&gates.narrow(1, 3 * h_size, h_size)?)?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            outs[t] = h.clone();
        }
        Ok(Tensor::cat(&outs, 0)?) // [N, H]
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.w_ih.clone(),
            self.w_hh.clone(),
            self.b_ih.clone(),
            self.b_hh.clone(),
        ]
    }
}

/// `1 / (1 + exp(-x))` from differentiable primitives.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

fn uniform_var(shape: &[usize], fan: usize, rng: &mut Rng, device: &Device) -> Result<Var> {
    let bound = 1.0 / (fan.max(1) as f64).sqrt();
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?)
}

/// The P-tuning prompt encoder: `forward() = f(E)`, `[N, D]`.
pub struct PromptEncoder {
    pub kind: EncoderKind,
    /// `E`, `[N, D]`.
    pub input: Var,
    /// `[(forward, backward)]` per layer; empty for the MLP.
    lstm: Vec<(LstmCell, LstmCell)>,
    mlp: Vec<Linear>,
}

impl PromptEncoder {
    /// An encoder with input embeddings `init [N, D]` (e.g. from
    /// [`crate::prompt::init::init_prompt`]) and hidden size `hidden`; the network weights are
    /// drawn from `seed`.
    pub fn new(kind: EncoderKind, init: &Tensor, hidden: usize, seed: u64) -> Result<Self> {
        let (n, d) = init.dims2()?;
        if n == 0 {
            bail!("a prompt encoder needs at least one token");
        }
        if hidden == 0 {
            bail!("the prompt encoder's hidden size must be at least 1");
        }
        let device = init.device().clone();
        let mut rng = Rng::new(seed, STREAM_ENCODER);
        let input = Var::from_tensor(&init.to_dtype(DType::F32)?.contiguous()?)?;
        let (lstm, mlp) = match kind {
            EncoderKind::Mlp => (
                Vec::new(),
                vec![
                    Linear::new(d, hidden, &mut rng, &device)?,
                    Linear::new(hidden, hidden, &mut rng, &device)?,
                    Linear::new(hidden, d, &mut rng, &device)?,
                ],
            ),
            EncoderKind::Lstm => {
                let mut layers = Vec::new();
                for l in 0..LSTM_LAYERS {
                    let n_in = if l == 0 { d } else { 2 * hidden };
                    layers.push((
                        LstmCell::new(n_in, hidden, &mut rng, &device)?,
                        LstmCell::new(n_in, hidden, &mut rng, &device)?,
                    ));
                }
                (
                    layers,
                    vec![
                        Linear::new(2 * hidden, 2 * hidden, &mut rng, &device)?,
                        Linear::new(2 * hidden, d, &mut rng, &device)?,
                    ],
                )
            }
        };
        Ok(PromptEncoder {
            kind,
            input,
            lstm,
            mlp,
        })
    }

    pub fn n_tokens(&self) -> usize {
        self.input.dim(0).unwrap_or(0)
    }

    /// The prompt `[N, D]`, differentiable with respect to every parameter.
    pub fn forward(&self) -> Result<Tensor> {
        let mut x = self.input.as_tensor().clone(); // [N, D]
        for (fw, bw) in &self.lstm {
            let a = fw.run(&x, false)?; // [N, H]
            let b = bw.run(&x, true)?; // [N, H]
            x = Tensor::cat(&[&a, &b], D::Minus1)?; // [N, 2H]
        }
        let last = self.mlp.len() - 1;
        for (i, layer) in self.mlp.iter().enumerate() {
            x = layer.forward(&x)?;
            if i < last {
                x = x.relu()?;
            }
        }
        Ok(x)
    }

    /// Every parameter, in a fixed order (input embeddings first), with a name for checkpoints.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = vec![("input".to_string(), self.input.clone())];
        for (l, (fw, bw)) in self.lstm.iter().enumerate() {
            for (dir, cell) in [("fw", fw), ("bw", bw)] {
                for (what, v) in ["w_ih", "w_hh", "b_ih", "b_hh"].iter().zip(cell.vars()) {
                    out.push((format!("lstm.{l}.{dir}.{what}"), v));
                }
            }
        }
        for (i, layer) in self.mlp.iter().enumerate() {
            out.push((format!("mlp.{i}.weight"), layer.w.clone()));
            out.push((format!("mlp.{i}.bias"), layer.b.clone()));
        }
        out
    }

    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }
}
