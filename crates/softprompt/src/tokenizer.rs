//! Text <-> ids. A thin wrapper over the `tokenizers` crate that also knows the special ids.

use crate::{Error, Result};
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding model input (GGUF `add_bos_token`, Llama tokenizers).
    pub add_bos: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Tokenizer {
    pub fn new(inner: tokenizers::Tokenizer, add_bos: bool, bos: Option<u32>, eos: Option<u32>) -> Self {
        Tokenizer {
            inner,
            add_bos,
            bos_token_id: bos,
            eos_token_id: eos,
        }
    }

    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("cannot read tokenizer: {e}")))?;
        Ok(Tokenizer::new(inner, false, None, None))
    }

    /// Ids of `text` without any special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text` as model input: BOS first when the model expects it.
    pub fn encode_input(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos_token_id);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A word-level Hugging Face `tokenizer.json`: `specials` are special tokens at the ids given
/// (the first is the unknown token), every other id `i` below `vocab_size` is the word `w{i}`,
/// and whitespace separates words. The workspace's tests and benchmarks give it to the
/// random-weight fixture models, which have no tokenizer of their own.
pub fn word_level_json(specials: &[(u32, &str)], vocab_size: u32) -> String {
    let mut vocab = serde_json::Map::new();
    for i in 0..vocab_size {
        let word = match specials.iter().find(|(id, _)| *id == i) {
            Some((_, content)) => content.to_string(),
            None => format!("w{i}"),
        };
        vocab.insert(word, i.into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|&(id, content)| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let unk = specials.first().map(|s| s.1).unwrap_or("[UNK]");
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
    })
    .to_string()
}
