//! Byte-level BPE tokenizers of GGUF files (`tokenizer.ggml.model = "gpt2"`): vocabulary,
//! merges and token types from the metadata, the pre-tokenizer llama.cpp uses for
//! `tokenizer.ggml.pre` (each family's split regex), BOS / EOS / add-BOS from the metadata.
//! An unknown pre-tokenizer is an error, never a silent default.

use super::gguf::Meta;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// llama.cpp's split regex for `llama-bpe` (Llama 3): digits in groups of up to three.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's split regex for `qwen2`: Llama 3's with every digit on its own.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names this file knows, for errors.
const SUPPORTED_PRE: &str =
    "default, gpt2, gpt-2, smollm, starcoder, refact, codeshell, llama-bpe, llama3, llama-v3, \
     falcon3, qwen2, deepseek-r1-qwen";

/// The pre-tokenizer of `tokenizer.ggml.pre` (absent: `default`, GPT-2's split).
fn pre_tokenizer(meta: &Meta) -> Result<PreTokenizerWrapper> {
    let pre = meta
        .opt("tokenizer.ggml.pre", Meta::string)?
        .unwrap_or_else(|| "default".into());
    // The split regex of each family, then the byte-to-unicode mapping of byte-level BPE.
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer `{pre}`: {e}")))?;
        let bytes = ByteLevel::new(false, true, false);
        Ok(Sequence::new(vec![split.into(), bytes.into()]).into())
    };
    let gpt2 = ByteLevel::new(false, true, true); // GPT-2's regex built in
    Ok(match pre.as_str() {
        "default" | "gpt2" | "gpt-2" => gpt2.into(),
        // llama.cpp splits every digit off before the GPT-2 regex for these.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Sequence::new(vec![Digits::new(true).into(), gpt2.into()]).into()
        }
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" => split_then_bytes(LLAMA3_REGEX)?,
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2_REGEX)?,
        other => {
            return Err(Error::config(
                meta.path,
                "tokenizer.ggml.pre",
                format!("unsupported pre-tokenizer `{other}` (supported: {SUPPORTED_PRE})"),
            ))
        }
    })
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) from the GGUF vocabulary and merges;
/// `bos`, `eos` as the config read them from the same metadata.
pub(super) fn tokenizer(meta: &Meta, bos: Option<u32>, eos: Option<u32>) -> Result<Tokenizer> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    Error::config(
                        meta.path,
                        "tokenizer.ggml.merges",
                        format!("bad merge `{m}`"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::config(meta.path, "tokenizer.ggml.merges", e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer(meta)?));
    inner.with_decoder(Some(ByteLevel::default()));

    // Control tokens (type 3: <|im_start|>, <|endoftext|>, ...) match whole and are skipped
    // when decoding; user-defined ones (type 4) match whole.
    if let Some(Value::Array(types)) = meta.map.get("tokenizer.ggml.token_type") {
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (tok, ty) in tokens.iter().zip(types) {
            match ty {
                Value::I32(3) | Value::U32(3) => {
                    special.push(AddedToken::from(tok.to_string(), true))
                }
                Value::I32(4) | Value::U32(4) => {
                    user.push(AddedToken::from(tok.to_string(), false))
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);
    }

    let add_bos = meta
        .opt("tokenizer.ggml.add_bos_token", Meta::bool)?
        .unwrap_or(false);
    // Inputs never end with EOS here (prompt tuning scores continuations of them).
    if meta.opt("tokenizer.ggml.add_eos_token", Meta::bool)? == Some(true) {
        return Err(Error::config(
            meta.path,
            "tokenizer.ggml.add_eos_token",
            "true: appending EOS to every input is not supported",
        ));
    }
    Ok(Tokenizer::new(inner, add_bos, bos, eos))
}
