//! Text <-> ids. A thin wrapper over the `tokenizers` crate that also knows the special ids.

use crate::{Error, Result};
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepend BOS when encoding model input (GGUF `add_bos_token`, Llama tokenizers).
    pub add_bos: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The model's chat template (Jinja source), when it ships one: see [`crate::chat`].
    chat_template: Option<String>,
}

impl Tokenizer {
    pub fn new(inner: tokenizers::Tokenizer, add_bos: bool, bos: Option<u32>, eos: Option<u32>) -> Self {
        Tokenizer {
            inner,
            add_bos,
            bos_token_id: bos,
            eos_token_id: eos,
            chat_template: None,
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

    /// The model's chat template source (GGUF `tokenizer.chat_template`, HF
    /// `chat_template.jinja` / `tokenizer_config.json`), rendered by [`crate::chat`].
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn set_chat_template(&mut self, source: Option<String>) {
        self.chat_template = source;
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
