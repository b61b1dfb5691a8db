//! Chat templates: a conversation rendered into the model's own text format.
//!
//! Chat models ship a Jinja template (GGUF `tokenizer.chat_template`; Hugging Face
//! `chat_template.jinja` or `tokenizer_config.json` `chat_template`) that turns a list of
//! messages into the text the model was tuned on. It is rendered here with `minijinja`, set up
//! as transformers sets up its Jinja environment: `trim_blocks` and `lstrip_blocks`, loop
//! controls, `tojson`, `raise_exception`, Python string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`: `minijinja-contrib`'s pycompat), and the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools = none`.
//!
//! A soft prompt is not part of the text: callers place it before the rendered conversation
//! (after BOS for prompts trained there), so the ids come from [`ChatTemplate::encode`].

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Largest template accepted, in bytes (real ones are a few kilobytes; Llama 3.1's ~4 KB).
pub const MAX_TEMPLATE_BYTES: usize = 64 << 10;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (the template decides what it accepts).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Checks that `source` compiles; `bos_token` and `eos_token` are the texts the template
    /// sees under those names.
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        let source = source.into();
        if source.len() > MAX_TEMPLATE_BYTES {
            crate::bail!("chat template: {} bytes, more than {MAX_TEMPLATE_BYTES}", source.len());
        }
        let t = ChatTemplate { source, bos_token: bos_token.into(), eos_token: eos_token.into() };
        t.environment().template_from_str(&t.source).map_err(|e| template_error("does not compile", &e))?;
        Ok(t)
    }

    /// The template of `tokenizer`'s model (`None` when the model has none), its special
    /// tokens' texts taken from the tokenizer's vocabulary.
    pub fn of(tokenizer: &Tokenizer) -> Result<Option<Self>> {
        let Some(source) = tokenizer.chat_template() else {
            return Ok(None);
        };
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        Self::new(source, text(tokenizer.bos_token_id), text(tokenizer.eos_token_id)).map(Some)
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn environment(&self) -> minijinja::Environment<'static> {
        let mut env = minijinja::Environment::new();
        // transformers renders with `trim_blocks=True, lstrip_blocks=True`.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env
    }

    /// `messages` as text; with `add_generation_prompt` the text ends where the assistant's
    /// answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => minijinja::Value::from(()),
            documents => minijinja::Value::from(()),
        };
        env.render_str(&self.source, ctx).map_err(|e| template_error("cannot render the conversation", &e))
    }

    /// The ids of the rendered conversation, as they follow a soft prompt: the text holds its
    /// special tokens itself (no BOS added); with `after_bos` (the prompt was trained after
    /// BOS, which then is part of the prompt's prefix) a leading BOS is left out.
    pub fn encode(&self, tokenizer: &Tokenizer, messages: &[Message], add_generation_prompt: bool, after_bos: bool) -> Result<Vec<u32>> {
        let text = self.render(messages, add_generation_prompt)?;
        let mut ids = tokenizer.encode(&text)?;
        if after_bos && tokenizer.bos_token_id.is_some() && ids.first().copied() == tokenizer.bos_token_id {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// The ids of a training example: `input` as the user's turn, then `target` as the
    /// assistant's, the target being exactly what the template puts after the generation
    /// prompt (`softprompt train --chat`). Returns (source ids, target ids). An error when the
    /// template does not render the answer after the generation prompt.
    pub fn encode_pair(&self, tokenizer: &Tokenizer, input: &str, target: &str, after_bos: bool) -> Result<(Vec<u32>, Vec<u32>)> {
        let user = [Message::new("user", input)];
        let prefix = self.render(&user, true)?;
        let whole = self.render(&[Message::new("user", input), Message::new("assistant", target)], false)?;
        let Some(answer) = whole.strip_prefix(&prefix) else {
            crate::bail!("chat template: the conversation with the answer does not start with the generation prompt, so the answer cannot be split off");
        };
        let source = self.encode(tokenizer, &user, true, after_bos)?;
        let target = tokenizer.encode(answer)?;
        Ok((source, target))
    }
}

/// Reads a JSONL file of `{"input", "target"}` pairs as chat examples for `model`
/// (`softprompt train --chat`): [`ChatTemplate::encode_pair`] with the model's template; the
/// source keeps a leading BOS the template renders (training removes it for after-BOS
/// prompts, as it does for plain examples). Decoder-only models with a template only.
pub fn read_examples(path: &std::path::Path, model: &crate::Model) -> Result<Vec<crate::batch::Example>> {
    if model.backbone.info().is_encoder_decoder() {
        crate::bail!("chat examples need a decoder-only model ({} is encoder-decoder)", model.path.display());
    }
    let tokenizer = model.tokenizer()?;
    let Some(template) = ChatTemplate::of(tokenizer)? else {
        crate::bail!("{} has no chat template (GGUF tokenizer.chat_template, or chat_template in tokenizer_config.json)", model.path.display());
    };
    let pairs = crate::task::read_jsonl(path)?;
    if pairs.is_empty() {
        crate::bail!("{}: no examples", path.display());
    }
    pairs
        .iter()
        .map(|p| {
            let (source, target) = template
                .encode_pair(tokenizer, &p.input, &p.target, false)
                .map_err(|e| Error::data(path, p.line, e.to_string()))?;
            if target.is_empty() {
                return Err(Error::data(path, p.line, "the assistant turn tokenizes to nothing"));
            }
            Ok(crate::batch::Example { source, target })
        })
        .collect()
}

fn template_error(what: &str, e: &minijinja::Error) -> Error {
    let mut msg = format!("chat template {what}: {e}");
    if let Some(detail) = e.detail() {
        if !msg.contains(detail) {
            msg.push_str(&format!(" ({detail})"));
        }
    }
    Error::invalid(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (ChatML with a default system turn).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_as_transformers_does() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let text = t.render(&[Message::new("user", "Hi there")], true).unwrap();
        // transformers' apply_chat_template(tokenize=False, add_generation_prompt=True).
        let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(text, want);
        let no_prompt = t.render(&[Message::new("system", "S"), Message::new("user", "U")], false).unwrap();
        assert_eq!(no_prompt, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
    }

    /// What HF templates use: raise_exception, loop controls, tojson, Python string methods,
    /// bos_token, namespace, trim/lstrip of blocks.
    #[test]
    fn the_features_hf_templates_need_work() {
        let src = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}\n\
                   {% set ns = namespace(n=0) %}\n\
                   {% for m in messages %}\n\
                     {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n\
                     {% set ns.n = ns.n + 1 %}\n\
                     [{{ m['role'] | upper }}:{{ m['content'].strip() }}{{ m.content.startswith('x') | tojson }}]\n\
                   {% endfor %}\n\
                   {{ ns.n }}{% if tools is not none %}tools{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let msgs = [Message::new("user", "xa  "), Message::new("skip", "?"), Message::new("assistant", "b")];
        // As Jinja2 renders it: a block tag's line end is trimmed, a text line's kept.
        assert_eq!(t.render(&msgs, false).unwrap(), "<s>[USER:xatrue]\n[ASSISTANT:bfalse]\n2");
        let e = t.render(&[Message::new("system", "s")], false).unwrap_err().to_string();
        assert!(e.contains("no system turns"), "{e}");
        let e = ChatTemplate::new("{% for %}", "", "").unwrap_err().to_string();
        assert!(e.contains("does not compile"), "{e}");
    }
}
