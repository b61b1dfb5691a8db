//! The OpenAI-compatible endpoints driven by the official `openai` Python client (a pinned
//! version, installed by the test into a virtual environment under `target/tmp`; PyPI must be
//! reachable the first time), against the server on 127.0.0.1:
//! - the tiny Llama fixture (word-level tokenizer, a chat template written here): models,
//!   completion, chat completion, both streamed, log-probabilities, errors; the chat answer
//!   checked against the library's greedy decoding of `[P; rendered conversation]`;
//! - SmolLM2-135M-Instruct (its own ChatML template) with two tasks: `model: <task>` answers
//!   equal `/v1/classify`'s and `/v1/generate`'s.
//!
//! `tests/openai_client/drive.py` only makes the calls and prints the responses; the
//! assertions are here. Streaming disconnects and the no-template error use the raw client.

mod common;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use softprompt::chat::{ChatTemplate, Message};
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::load::{load_model, Model};
use softprompt_serve::registry::{write_task_folder, TaskMeta};
use softprompt_serve::{ServeConfig, Server};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The `openai` package version the test installs.
const OPENAI_VERSION: &str = "3.57.0";
const TOKEN: &str = "test-token";

/// The virtual environment's python, created (and the client installed) on first use.
fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("openai-venv-{OPENAI_VERSION}"));
        let py = venv.join("bin").join("python");
        let done = venv.join(".installed");
        if !done.is_file() {
            let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().map(|s| s.success());
            assert!(matches!(ok, Ok(true)), "python3 -m venv {} failed: python3 with venv is needed", venv.display());
            let pkg = format!("openai=={OPENAI_VERSION}");
            let ok = Command::new(&py).args(["-m", "pip", "install", "--quiet", &pkg]).status().map(|s| s.success());
            assert!(matches!(ok, Ok(true)), "pip install {pkg} failed (PyPI must be reachable)");
            std::fs::write(&done, "").unwrap();
        }
        py
    })
    .clone()
}

/// Runs the calls of `plan` with the Python client against `addr`; one result per call.
fn drive(addr: SocketAddr, plan: &Value) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let plan_path = dir.path().join("plan.json");
    std::fs::write(&plan_path, plan.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client/drive.py");
    let out = Command::new(python())
        .arg(script)
        .arg(format!("http://{addr}/v1"))
        .arg(&plan_path)
        .output()
        .expect("run the python driver");
    assert!(out.status.success(), "driver failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap_or_else(|e| panic!("driver output ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// A word-level chat template for the tiny model: every turn `w3|w5|w6 content w4`, the
/// generation prompt `w6`; BOS first; system turns refused after the first message.
const TINY_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system only first') }}{% endif %}{% if m['role'] == 'user' %}w3 {% elif m['role'] == 'system' %}w5 {% else %}w6 {% endif %}{{ m['content'] | trim }} w4 {% endfor %}{% if add_generation_prompt %}w6{% endif %}";

/// The tiny Llama fixture with a word-level tokenizer (0 `<unk>`, 1 `<s>`, 2 `</s>`, `w{i}`)
/// and, with `chat`, [`TINY_TEMPLATE`] in its tokenizer_config.json.
fn tiny(chat: bool) -> Arc<Model> {
    static MODELS: OnceLock<Vec<(tempfile::TempDir, Arc<Model>)>> = OnceLock::new();
    let models = MODELS.get_or_init(|| {
        [true, false]
            .into_iter()
            .map(|with_template| {
                let root = common::tiny_llama_dir();
                if with_template {
                    let cfg = json!({"chat_template": TINY_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"});
                    std::fs::write(root.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
                }
                let model = Arc::new(load_model(root.path(), &Device::Cpu).unwrap());
                (root, model)
            })
            .collect()
    });
    models[usize::from(!chat)].1.clone()
}

/// `n` seeded random rows of the model's width, scaled by `scale`.
fn random_prompt(model: &Model, n: usize, seed: u64, scale: f32) -> Tensor {
    let d = model.backbone.info().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
}

fn serve(model: &Arc<Model>, dir: &Path, token: Option<&str>) -> Server {
    let mut cfg = ServeConfig::new(dir);
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg.token = token.map(str::to_string);
    Server::start(model.clone(), cfg).unwrap()
}

fn post(addr: SocketAddr, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
    let (status, text) = softprompt_serve::client::request(addr, "POST", path, Some(body.to_string().as_bytes()), token).unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// The texts of a completion or chat stream's chunks joined, its finish reason, and the
/// usage of its last chunk.
fn joined(chunks: &Value) -> (String, String, Value) {
    let chunks = chunks.as_array().unwrap_or_else(|| panic!("not a stream: {chunks}"));
    let mut text = String::new();
    let mut finish = String::new();
    for c in chunks {
        for ch in c["choices"].as_array().unwrap() {
            let piece = ch["text"].as_str().or_else(|| ch["delta"]["content"].as_str()).unwrap_or("");
            text.push_str(piece);
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    let usage = chunks.last().map(|c| c["usage"].clone()).unwrap_or(Value::Null);
    (text, finish, usage)
}

fn words(ids: &[u32]) -> String {
    ids.iter().map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn the_openai_client_drives_the_tiny_model() {
    let model = tiny(true);
    let dir = tempfile::tempdir().unwrap();
    let gen_meta = TaskMeta { template: Some("w10 {text} w11".into()), ..TaskMeta::default() };
    let cls_meta = TaskMeta {
        labels: vec!["yes".into(), "no".into()],
        verbalizer: vec!["w20".into(), "w21".into()],
        ..TaskMeta::default()
    };
    let gen_prompt = random_prompt(&model, 4, 1, 0.8);
    write_task_folder(&dir.path().join("gen"), std::slice::from_ref(&gen_prompt), &model, Some(&gen_meta)).unwrap();
    write_task_folder(&dir.path().join("cls"), &[random_prompt(&model, 3, 2, 0.8)], &model, Some(&cls_meta)).unwrap();
    write_task_folder(&dir.path().join("ens"), &[random_prompt(&model, 2, 3, 0.8), random_prompt(&model, 5, 4, 0.8)], &model, None)
        .unwrap();
    let server = serve(&model, dir.path(), Some(TOKEN));
    let addr = server.addr;

    let input = words(&[30, 31, 32, 33]);
    let messages = json!([{"role": "system", "content": "w40 w41"}, {"role": "user", "content": input}]);
    let plan = json!([
        {"kind": "models"},
        {"kind": "completion", "args": {"model": "gen", "prompt": input, "max_tokens": 6, "temperature": 0, "logprobs": 2}},
        {"kind": "completion_stream", "args": {"model": "gen", "prompt": input, "max_tokens": 6, "temperature": 0,
            "stream_options": {"include_usage": true}}},
        {"kind": "completion", "args": {"model": "cls", "prompt": input, "max_tokens": 1, "temperature": 0, "logprobs": 2}},
        {"kind": "completion", "args": {"model": "ens", "prompt": input, "max_tokens": 5, "temperature": 0}},
        {"kind": "completion", "args": {"model": "base", "prompt": input, "max_tokens": 5, "temperature": 0}},
        {"kind": "chat", "args": {"model": "gen", "messages": messages, "max_tokens": 6, "temperature": 0,
            "logprobs": true, "top_logprobs": 3}},
        {"kind": "chat_stream", "args": {"model": "gen", "messages": messages, "max_tokens": 6, "temperature": 0}},
        {"kind": "completion", "args": {"model": "gen", "prompt": input, "max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "seed": 7}},
        {"kind": "completion", "args": {"model": "gen", "prompt": input, "max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "seed": 7}},
        // Errors: an unknown model, n > 1, a wrong token, a template exception, a bad stop list.
        {"kind": "completion", "args": {"model": "nope", "prompt": input}},
        {"kind": "chat", "args": {"model": "gen", "messages": messages, "n": 2}},
        {"kind": "completion", "api_key": "wrong", "args": {"model": "gen", "prompt": input}},
        {"kind": "chat", "args": {"model": "gen", "messages": [{"role": "user", "content": "w3"}, {"role": "system", "content": "w5"}]}},
        {"kind": "model", "args": {"model": "cls"}},
    ]);
    let r = drive(addr, &plan);

    // Models: every task and `base`.
    let ids: Vec<&str> = r[0].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cls", "ens", "gen", "base"]);

    // A completion equals /v1/generate's answer (greedy), with usage and log-probabilities.
    let (status, native) = post(addr, "/v1/generate", &json!({"task": "gen", "input": input, "max_new_tokens": 6}), Some(TOKEN));
    assert_eq!(status, 200, "{native}");
    let c = &r[1];
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["model"], "gen");
    assert_eq!(c["choices"][0]["text"], native["text"]);
    let n_tokens = native["tokens"].as_array().unwrap().len();
    let native_finish = if native["finish_reason"] == "length" { "length" } else { "stop" };
    assert_eq!(c["choices"][0]["finish_reason"], native_finish);
    let source_len = 1 + 2 + 4; // BOS, the template's two words, the input
    assert_eq!(c["usage"]["prompt_tokens"], source_len);
    assert_eq!(c["usage"]["completion_tokens"], n_tokens);
    let lp = &c["choices"][0]["logprobs"];
    let native_lps = common::as_f32s(&native["logprobs"]);
    let eos_last = native["finish_reason"] == "eos";
    let shown = n_tokens - usize::from(eos_last);
    assert_eq!(lp["tokens"].as_array().unwrap().len(), shown);
    for (i, want) in native_lps.iter().take(shown).enumerate() {
        let got = lp["token_logprobs"][i].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-5, "token {i}: {got} vs {want}");
        // The chosen token is the most likely (greedy), so it leads the alternatives.
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 2);
        let best = top.values().map(|v| v.as_f64().unwrap() as f32).fold(f32::NEG_INFINITY, f32::max);
        assert!((best - got).abs() < 1e-5);
    }

    // The same streamed: the pieces join to the same text; usage last.
    let (text, finish, usage) = joined(&r[2]);
    assert_eq!(text, native["text"].as_str().unwrap());
    assert_eq!(finish, native_finish);
    assert_eq!(usage["completion_tokens"], n_tokens);

    // A task with labels answers with its best label's verbalizer, as /v1/classify ranks.
    let (status, cls) = post(addr, "/v1/classify", &json!({"task": "cls", "input": input}), Some(TOKEN));
    assert_eq!(status, 200, "{cls}");
    let want = if cls["label"] == "yes" { "w20" } else { "w21" };
    assert_eq!(r[3]["choices"][0]["text"], want);
    let score = cls["scores"][cls["label"].as_str().unwrap()].as_f64().unwrap();
    assert!((r[3]["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().unwrap() - score).abs() < 1e-5);

    // An ensemble and the bare model generate as /v1/generate does.
    let (_, ens) = post(addr, "/v1/generate", &json!({"task": "ens", "input": input, "max_new_tokens": 5}), Some(TOKEN));
    assert_eq!(r[4]["choices"][0]["text"], ens["text"]);
    let tokenizer = model.tokenizer().unwrap();
    let base_src = tokenizer.encode_input(&input).unwrap();
    let opts = GenerateOptions { max_new_tokens: 5, stop_at_eos: true };
    let base = greedy(&model.backbone, None, &[base_src], &opts, &Device::Cpu).unwrap();
    assert_eq!(r[5]["choices"][0]["text"].as_str().unwrap(), tokenizer.decode(&base.tokens[0]).unwrap());

    // Chat: the library's greedy decoding after [P; rendered conversation].
    let template = ChatTemplate::of(tokenizer).unwrap().unwrap();
    let conv = [Message::new("system", "w40 w41"), Message::new("user", format!("w10 {input} w11"))];
    let chat_ids = template.encode(tokenizer, &conv, true, false).unwrap();
    assert_eq!(tokenizer.decode(&chat_ids[..4]).unwrap(), "w5 w40 w41", "the template rendered (after BOS)");
    let lib = greedy(&model.backbone, Some(&gen_prompt), &[chat_ids.clone()], &GenerateOptions { max_new_tokens: 6, stop_at_eos: true }, &Device::Cpu)
        .unwrap();
    let want_text = tokenizer.decode(&lib.tokens[0]).unwrap();
    let chat = &r[6];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["choices"][0]["message"]["content"].as_str().unwrap(), want_text);
    assert_eq!(chat["usage"]["prompt_tokens"], chat_ids.len());
    let content = chat["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for e in content {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3);
        assert_eq!(e["top_logprobs"][0]["token"], e["token"], "greedy picks the most likely");
    }
    let (text, finish, _) = joined(&r[7]);
    assert_eq!(text, want_text);
    assert_eq!(finish, chat["choices"][0]["finish_reason"].as_str().unwrap());
    assert_eq!(r[7][0]["choices"][0]["delta"]["role"], "assistant");

    // Sampling with a seed is reproducible.
    assert_eq!(r[8]["choices"][0]["text"], r[9]["choices"][0]["text"]);

    // Errors in OpenAI's shape, raised as the client's exception classes.
    let e = &r[10]["error"];
    assert_eq!((e["status"].as_u64(), e["class"].as_str()), (Some(404), Some("NotFoundError")));
    assert_eq!(e["body"]["code"], "model_not_found");
    assert_eq!(e["body"]["param"], "model");
    assert_eq!(e["body"]["type"], "not_found_error");
    let e = &r[11]["error"];
    assert_eq!((e["status"].as_u64(), e["class"].as_str()), (Some(400), Some("BadRequestError")));
    assert_eq!(e["body"]["param"], "n");
    let e = &r[12]["error"];
    assert_eq!((e["status"].as_u64(), e["class"].as_str()), (Some(401), Some("AuthenticationError")));
    assert_eq!(e["body"]["type"], "authentication_error");
    let e = &r[13]["error"];
    assert_eq!(e["status"].as_u64(), Some(400));
    assert!(e["body"]["message"].as_str().unwrap().contains("system only first"), "{e}");
    assert_eq!(r[14]["id"], "cls");
}

/// A model without a chat template: chat requests get a clear 400 (completions work).
#[test]
fn chat_without_a_template_is_a_clear_400() {
    let model = tiny(false);
    let dir = tempfile::tempdir().unwrap();
    let server = serve(&model, dir.path(), None);
    let body = json!({"model": "base", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2});
    let (status, v) = post(server.addr, "/v1/chat/completions", &body, None);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("no chat template"), "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let body = json!({"model": "base", "prompt": "w5", "max_tokens": 2, "temperature": 0});
    let (status, v) = post(server.addr, "/v1/completions", &body, None);
    assert_eq!(status, 200, "{v}");
    // Native errors outside the OpenAI paths keep their shape.
    let (status, v) = post(server.addr, "/v1/generate", &json!({"task": "nope", "input": "w5"}), None);
    assert_eq!(status, 404);
    assert!(v["error"].is_string(), "{v}");
    // /openapi.json documents both APIs.
    let (status, doc) = softprompt_serve::client::request(server.addr, "GET", "/openapi.json", None, None).unwrap();
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for path in ["/v1/models", "/v1/models/{model}", "/v1/completions", "/v1/chat/completions", "/v1/generate", "/v1/classify"] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    for schema in ["CompletionRequest", "ChatCompletionRequest", "Completion", "ChatCompletion", "OpenAIError", "GenerateRequest"] {
        assert!(doc["components"]["schemas"].get(schema).is_some(), "{schema}");
    }
    // An unknown field is refused by name.
    let body = json!({"model": "base", "prompt": "w5", "frobnicate": 1});
    let (status, v) = post(server.addr, "/v1/completions", &body, None);
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("frobnicate"), "{v}");
}

/// A streaming client that disconnects frees its batch row: the worker counts it cancelled
/// long before its `max_tokens` could be generated.
#[test]
fn a_streaming_client_that_disconnects_is_cancelled() {
    let model = tiny(true);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::new(dir.path());
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg.max_new_tokens = 1500;
    let server = Server::start(model.clone(), cfg).unwrap();
    let addr = server.addr;
    // An input whose greedy decoding runs to the length limit (no EOS), found unstreamed.
    let request = (3..100)
        .map(|w| json!({"model": "base", "prompt": format!("w{w} w{}", w + 1), "max_tokens": 1500, "temperature": 0}))
        .find(|request| {
            let (status, whole) = post(addr, "/v1/completions", request, None);
            assert_eq!(status, 200, "{whole}");
            whole["choices"][0]["finish_reason"] == "length"
        })
        .expect("an input that never reaches EOS");
    let mut body = request.clone();
    body["stream"] = json!(true);
    let body = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("text/event-stream"), "{first}");
    drop(s);
    let cancelled = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("softprompt_cancelled_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let start = Instant::now();
    loop {
        let (_, metrics) = softprompt_serve::client::request(addr, "GET", "/metrics", None, None).unwrap();
        if cancelled(&metrics) >= 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the disconnected stream was never cancelled:\n{metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SmolLM2 with two tasks: `model: <task>` answers equal /v1/classify's and /v1/generate's,
/// streamed or not, and chat completions stream what they answer whole.
#[test]
fn the_openai_client_matches_the_native_endpoints_on_smollm2() {
    let model = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let sst = TaskMeta {
        template: Some("Review: {text}\nSentiment:".into()),
        labels: vec!["positive".into(), "negative".into()],
        verbalizer: vec![" positive".into(), " negative".into()],
        ..TaskMeta::default()
    };
    let qa = TaskMeta { template: Some("Question: {text}\nAnswer:".into()), ..TaskMeta::default() };
    write_task_folder(&dir.path().join("sst"), &[random_prompt(&model, 6, 11, 0.05)], &model, Some(&sst)).unwrap();
    write_task_folder(&dir.path().join("qa"), &[random_prompt(&model, 8, 12, 0.05)], &model, Some(&qa)).unwrap();
    let server = serve(&model, dir.path(), Some(TOKEN));
    let addr = server.addr;
    let reviews = ["a gripping, beautifully shot film", "dull and far too long"];
    let question = "What is the capital of France?";
    let mut plan = vec![json!({"kind": "models"})];
    for r in reviews {
        plan.push(json!({"kind": "completion", "args": {"model": "sst", "prompt": r, "max_tokens": 2, "temperature": 0}}));
    }
    plan.push(json!({"kind": "completion", "args": {"model": "qa", "prompt": question, "max_tokens": 12, "temperature": 0}}));
    plan.push(json!({"kind": "completion_stream", "args": {"model": "qa", "prompt": question, "max_tokens": 12, "temperature": 0, "stop": ["\n"]}}));
    plan.push(json!({"kind": "completion", "args": {"model": "qa", "prompt": question, "max_tokens": 12, "temperature": 0, "stop": ["\n"]}}));
    let messages = json!([{"role": "user", "content": question}]);
    plan.push(json!({"kind": "chat", "args": {"model": "qa", "messages": messages, "max_tokens": 12, "temperature": 0}}));
    plan.push(json!({"kind": "chat_stream", "args": {"model": "qa", "messages": messages, "max_tokens": 12, "temperature": 0}}));
    let r = drive(addr, &Value::Array(plan));

    let ids: Vec<&str> = r[0].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["qa", "sst", "base"]);
    for (i, review) in reviews.iter().enumerate() {
        let (status, cls) = post(addr, "/v1/classify", &json!({"task": "sst", "input": review}), Some(TOKEN));
        assert_eq!(status, 200);
        let want = format!(" {}", cls["label"].as_str().unwrap());
        assert_eq!(r[1 + i]["choices"][0]["text"].as_str().unwrap(), want, "review {i}");
    }
    let (_, gen) = post(addr, "/v1/generate", &json!({"task": "qa", "input": question, "max_new_tokens": 12}), Some(TOKEN));
    assert_eq!(r[3]["choices"][0]["text"], gen["text"]);
    let (_, gen_stop) =
        post(addr, "/v1/generate", &json!({"task": "qa", "input": question, "max_new_tokens": 12, "stop": ["\n"]}), Some(TOKEN));
    let (text, _, _) = joined(&r[4]);
    assert_eq!(text, gen_stop["text"].as_str().unwrap());
    assert_eq!(r[5]["choices"][0]["text"], gen_stop["text"]);
    let chat = r[6]["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!chat.is_empty());
    let (text, finish, _) = joined(&r[7]);
    assert_eq!(text, chat);
    assert_eq!(finish, r[6]["choices"][0]["finish_reason"].as_str().unwrap());
}

/// A task trained on chat-formatted examples (task.json `chat: true`, `softprompt train
/// --chat`) renders its inputs as the user's turn of the model's template on every endpoint;
/// on a model without a template it is not served (listed by `GET /v1/tasks?errors`).
#[test]
fn a_chat_trained_task_renders_its_inputs_with_the_template() {
    let model = tiny(true);
    let dir = tempfile::tempdir().unwrap();
    let meta = TaskMeta { chat: true, ..TaskMeta::default() };
    let prompt = random_prompt(&model, 3, 21, 0.8);
    write_task_folder(&dir.path().join("chatty"), std::slice::from_ref(&prompt), &model, Some(&meta)).unwrap();
    let server = serve(&model, dir.path(), None);
    let addr = server.addr;
    let input = "w30 w31";
    let (status, gen) = post(addr, "/v1/generate", &json!({"task": "chatty", "input": input, "max_new_tokens": 5}), None);
    assert_eq!(status, 200, "{gen}");
    let tokenizer = model.tokenizer().unwrap();
    let template = ChatTemplate::of(tokenizer).unwrap().unwrap();
    let ids = template.encode(tokenizer, &[Message::new("user", input)], true, false).unwrap();
    let opts = GenerateOptions { max_new_tokens: 5, stop_at_eos: true };
    let lib = greedy(&model.backbone, Some(&prompt), &[ids], &opts, &Device::Cpu).unwrap();
    assert_eq!(common::as_u32s(&gen["tokens"]), lib.tokens[0]);
    // The chat endpoint renders the same conversation, so it answers the same.
    let body = json!({"model": "chatty", "messages": [{"role": "user", "content": input}], "max_tokens": 5, "temperature": 0});
    let (status, chat) = post(addr, "/v1/chat/completions", &body, None);
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["choices"][0]["message"]["content"], gen["text"]);
    drop(server);

    let plain = tiny(false);
    let server = serve(&plain, dir.path(), None);
    let (status, errors) = softprompt_serve::client::request(server.addr, "GET", "/v1/tasks?errors", None, None).unwrap();
    assert_eq!(status, 200);
    assert!(errors.contains("chatty") && errors.contains("chat template"), "{errors}");
}
