//! SentencePiece-style GGUF vocabularies (`tokenizer.ggml.model = llama`: Llama 2, Mistral,
//! Gemma), built with the tokenizers crate the way transformers builds them from the same
//! file (`integrations/gguf/gguf_tokenizer_mapping.py`): a BPE with byte fallback whose merges
//! are recovered from the vocabulary, ranked by the tokens' scores (Gemma: by their order in
//! the file, which is its merge order, not its scores).
//!
//! - Gemma: spaces become `▁` by a normalizer, no prefix space; tokens of spaces only are
//!   stored as real spaces and looked up as `▁`s.
//! - Llama / Mistral: a `▁` is prepended to the text and spaces become `▁` (Metaspace).
//!
//! Control tokens (`<bos>`, `<start_of_turn>`, ...) match whole and are skipped when
//! decoding; user-defined ones match whole.

use super::gguf::Meta;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, DecoderWrapper};

const SPACE: &str = "\u{2581}";

/// The tokenizer of a GGUF file whose `tokenizer.ggml.model` is `llama`; `arch` is its
/// `general.architecture`.
pub(super) fn tokenizer(
    meta: &Meta,
    arch: &str,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Tokenizer> {
    let gemma = arch.starts_with("gemma");
    let key = "tokenizer.ggml.tokens";
    let tokens: Vec<String> = meta
        .strings(key)?
        .into_iter()
        .map(
            |t| match gemma && !t.is_empty() && t.chars().all(|c| c == ' ') {
                true => SPACE.repeat(t.chars().count()),
                false => t.to_string(),
            },
        )
        .collect();
    if u32::try_from(tokens.len()).is_err() {
        return Err(Error::config(meta.path, key, "more than 2^32 tokens"));
    }
    // As Python dicts built from the list: first-seen order, the last id of a repeated token.
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t, i as u32).is_none() {
            order.push(t);
        }
    }
    let rank: HashMap<&str, f64> = if gemma {
        vocab.iter().map(|(&t, &i)| (t, -(i as f64))).collect()
    } else {
        let scores = meta.f32s("tokenizer.ggml.scores")?;
        if scores.len() != tokens.len() {
            return Err(Error::config(
                meta.path,
                "tokenizer.ggml.scores",
                format!("{} scores for {} tokens", scores.len(), tokens.len()),
            ));
        }
        tokens
            .iter()
            .map(String::as_str)
            .zip(scores.iter().map(|&s| s as f64))
            .collect()
    };
    let merges = merges_from_vocab(&order, &vocab, &rank);

    let bpe_vocab: Vocab = vocab.iter().map(|(&t, &i)| (t.to_string(), i)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if gemma && vocab.contains_key("<unk>") {
        builder = builder.unk_token("<unk>".into());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::config(meta.path, key, format!("cannot build the vocabulary: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let space_to_piece = || {
        Replace::new(" ", SPACE).map_err(|e| Error::invalid(format!("tokenizer normalizer: {e}")))
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE, " ")
            .map_err(|e| Error::invalid(format!("tokenizer decoder: {e}")))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if gemma {
        inner.with_normalizer(Some(space_to_piece()?));
    } else {
        inner.with_pre_tokenizer(Some(Metaspace::new(
            '\u{2581}',
            PrependScheme::First,
            false,
        )));
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(Sequence::new(decoders)));

    if let Some(types) = meta.ints_opt("tokenizer.ggml.token_type")? {
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (tok, ty) in tokens.iter().zip(types) {
            match ty {
                3 => special.push(AddedToken::from(tok.clone(), true)),
                4 => user.push(AddedToken::from(tok.clone(), false).normalized(false)),
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);
    }
    // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    let add_bos = meta
        .opt("tokenizer.ggml.add_bos_token", Meta::bool)?
        .unwrap_or(true)
        && bos.is_some();
    Ok(Tokenizer::new(inner, add_bos, bos, eos))
}

/// The merges a vocabulary implies, best first (transformers' `generate_merges`): every
/// split of a token into two tokens, ranked by the token's `rank` (higher first), then by
/// the longer left and right parts; ties keep the vocabulary's order, and the splits of one
/// token are ordered by the ids of their parts.
fn merges_from_vocab(
    order: &[&str],
    vocab: &HashMap<&str, u32>,
    rank: &HashMap<&str, f64>,
) -> Vec<(String, String)> {
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &token in order {
        let r = rank.get(token).copied().unwrap_or(f64::NEG_INFINITY);
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, rr)| (l, rr, r))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab.get(l).copied(), vocab.get(r).copied()));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| chars(b.0).cmp(&chars(a.0)))
            .then_with(|| chars(b.1).cmp(&chars(a.1)))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recovered merges on a small vocabulary: ranked by score, and the splits of one
    /// token by the ids of their parts.
    #[test]
    fn merges_follow_scores() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let vocab: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, i as u32))
            .collect();
        let rank: HashMap<&str, f64> = [
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", -1.0),
            ("bc", -2.0),
            ("abc", -0.5),
        ]
        .into_iter()
        .collect();
        let got = merges_from_vocab(&tokens, &vocab, &rank);
        // "abc" first (best score), its longer left part first; then "ab", then "bc".
        let want = [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")];
        let got: Vec<(&str, &str)> = got.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        assert_eq!(got, want);
    }
}
