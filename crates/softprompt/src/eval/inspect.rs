//! Interpretability (Lester et al. 2021, section 7): the vocabulary tokens nearest to each
//! soft-prompt vector by cosine similarity with the frozen input embedding table.

use crate::model::Backbone;
use crate::tokenizer::Tokenizer;
use crate::Result;
use candle_core::{DType, Device, Tensor, D};

/// A vocabulary token near a prompt vector.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Neighbour {
    pub id: u32,
    /// The token as the tokenizer's vocabulary spells it (e.g. `Ġgood`), when there is one.
    pub token: Option<String>,
    /// The token decoded to text (e.g. ` good`), when there is a tokenizer.
    pub text: Option<String>,
    /// Cosine similarity with the prompt vector.
    pub similarity: f32,
}

/// The whole input embedding table `[V, D]` (f32) of a backbone.
pub fn embedding_table(backbone: &Backbone, device: &Device) -> Result<Tensor> {
    let v = backbone.info().vocab_size;
    let ids = Tensor::arange(0u32, v as u32, device)?.unsqueeze(0)?; // [1, V]
    Ok(backbone.embed(&ids)?.squeeze(0)?.to_dtype(DType::F32)?) // [V, D]
}

/// Rows of `x` (`[R, D]`) scaled to unit length (zero rows stay zero).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f32::MAX)?; // [R, 1]
    Ok(x.broadcast_div(&norm)?)
}

/// Cosine similarities `[N, V]` between prompt rows (`[N, D]`) and table rows (`[V, D]`).
pub fn cosine_similarities(prompt: &Tensor, table: &Tensor) -> Result<Tensor> {
    let (_, d) = prompt.dims2()?;
    let (_, dt) = table.dims2()?;
    if d != dt {
        crate::bail!("the prompt's width {d} differs from the embedding table's {dt}");
    }
    let p = unit_rows(&prompt.to_dtype(DType::F32)?)?;
    let t = unit_rows(&table.to_dtype(DType::F32)?)?;
    Ok(p.matmul(&t.t()?)?)
}

/// For each prompt position, the `top` nearest tokens of `table`, most similar first (ties:
/// lower id first).
pub fn nearest_tokens(
    prompt: &Tensor,
    table: &Tensor,
    top: usize,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<Vec<Neighbour>>> {
    let sims = cosine_similarities(prompt, table)?.to_vec2::<f32>()?;
    Ok(sims
        .iter()
        .map(|row| {
            let mut ids: Vec<usize> = (0..row.len()).collect();
            let order = |a: &usize, b: &usize| {
                row[*b]
                    .partial_cmp(&row[*a])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(b))
            };
            let k = top.min(ids.len());
            if k > 0 && k < ids.len() {
                ids.select_nth_unstable_by(k - 1, order);
            }
            ids.truncate(k);
            ids.sort_by(order);
            ids.into_iter()
                .map(|i| Neighbour {
                    id: i as u32,
                    token: tokenizer.and_then(|t| t.id_to_token(i as u32)),
                    text: tokenizer.and_then(|t| t.decode(&[i as u32]).ok()),
                    similarity: row[i],
                })
                .collect()
        })
        .collect())
}
