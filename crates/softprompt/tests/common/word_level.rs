//! A word-level tokenizer for the random-weight fixture models, which have no tokenizer of
//! their own. Shared by the test suites and benchmarks of every crate (included with
//! `#[path = ...] mod word_level;`), so it is not part of the library's API.

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
