//! Attacks on the task store, against the real server on 127.0.0.1 (the tiny Llama fixture
//! with a word-level tokenizer): uploads whose fields multiply memory, too many prompt rows
//! or tasks, templates that copy the input many times, unreadable task folders at start-up,
//! a crash in the middle of a replacement, and a prompt-cache budget that forces evictions.
//! Each test failed before its fix (the first one aborted the whole test process).

mod common;
use candle_core::{Device, Tensor};
use common::assert_same_answer;
use rand::{Rng, SeedableRng};
use softprompt::decode::DecodeParams;
use softprompt::load::{load_model, Model};
use softprompt::prompt::{AdapterConfig, PeftAdapter};
use softprompt_serve::engine::{self, GenItem, Prefill, PromptKv, PromptKvStore};
use softprompt_serve::registry::{write_task_folder, TaskMeta};
use softprompt_serve::{ServeConfig, Server};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The tiny Llama fixture (hidden size 32, 2 layers, 2 KV heads of 8) with a word-level
/// tokenizer: 0 `<unk>`, 1 `<s>`, 2 `</s>`, `w{i}` for every other id below 256.
fn tiny() -> Arc<Model> {
    static MODEL: OnceLock<(tempfile::TempDir, Arc<Model>)> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let root = common::tiny_llama_dir();
            let model = Arc::new(load_model(root.path(), &Device::Cpu).unwrap());
            (root, model)
        })
        .1
        .clone()
}

/// `n` seeded random rows of the model's width.
fn rows(model: &Model, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let d = model.backbone.info().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| (0..d).map(|_| rng.random_range(-0.8f32..0.8)).collect()).collect()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn serve(model: &Arc<Model>, dir: &Path, edit: impl FnOnce(&mut ServeConfig)) -> Server {
    let mut cfg = ServeConfig::new(dir);
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg.allow_writes = true; // these tests attack the store, past the write switch
    edit(&mut cfg);
    Server::start(model.clone(), cfg).unwrap()
}

fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = softprompt_serve::client::request(addr, method, path, body.as_deref().map(str::as_bytes), None)
        .expect("HTTP request");
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

fn task_names(addr: SocketAddr) -> Vec<String> {
    let (status, list) = call(addr, "GET", "/v1/tasks", None);
    assert_eq!(status, 200);
    list.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
}

/// The folder names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

const LABELS: &str = r#"{"labels": ["x", "y"], "verbalizer": ["w10", "w11"]}"#;

/// The issue's one-request crash: `num_transformer_submodules` of 10^12 made `save` allocate
/// 10^12 copies of the prompt (the process aborted); about 1000 wrote gigabytes per PUT. Any
/// value but 1 (2 is for seq2seq models only) is now refused before anything is sized.
#[test]
fn uploads_whose_fields_multiply_memory_are_refused() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(&model, dir.path(), |_| {});
    let prompt = rows(&model, 3, 1);
    for n in [1_000_000_000_000u64, 1000, 2, 0] {
        let config = serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 32,
            "num_transformer_submodules": n});
        let body = serde_json::json!({"prompt": prompt, "adapter_config": config});
        let (status, got) = call(server.addr, "PUT", "/v1/tasks/big", Some(&body));
        assert_eq!(status, 400, "num_transformer_submodules {n}: {got}");
        assert!(got["error"].as_str().unwrap().contains("num_transformer_submodules"), "{got}");
    }
    // token_dim and num_virtual_tokens that multiply: refused, not wrapped or allocated.
    let config = serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": u64::MAX / 2,
        "token_dim": u64::MAX / 2, "num_transformer_submodules": 1});
    let (status, got) = call(server.addr, "PUT", "/v1/tasks/big", Some(&serde_json::json!({"prompt": prompt, "adapter_config": config})));
    assert_eq!(status, 400, "{got}");
    assert_eq!(call(server.addr, "GET", "/health", None).0, 200);
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    // The same body with the right count is served.
    let config = serde_json::json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 32,
        "num_transformer_submodules": 1});
    let (status, got) = call(server.addr, "PUT", "/v1/tasks/big", Some(&serde_json::json!({"prompt": prompt, "adapter_config": config})));
    assert_eq!(status, 201, "{got}");
}

/// Prompt rows per task (`--max-prompt-tokens`, ensemble members together) and templates
/// (`{text}` exactly once, at most 4096 bytes) are capped.
#[test]
fn prompt_rows_and_templates_are_capped() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(&model, dir.path(), |c| c.store.max_prompt_tokens = 8);
    let put = |name: &str, body: serde_json::Value| call(server.addr, "PUT", &format!("/v1/tasks/{name}"), Some(&body));
    let (status, got) = put("long", serde_json::json!({"prompt": rows(&model, 9, 2)}));
    assert_eq!(status, 400, "{got}");
    assert!(got["error"].as_str().unwrap().contains("--max-prompt-tokens"), "{got}");
    let (status, got) = put("ens", serde_json::json!({"prompts": [rows(&model, 5, 3), rows(&model, 5, 4)]}));
    assert_eq!(status, 400, "{got}");
    let (status, got) = put("ens", serde_json::json!({"prompts": [rows(&model, 4, 3), rows(&model, 4, 4)]}));
    assert_eq!(status, 201, "{got}");

    let task = |template: String| {
        let mut t: serde_json::Value = serde_json::from_str(LABELS).unwrap();
        t["template"] = template.into();
        serde_json::json!({"prompt": rows(&model, 2, 5), "task": t})
    };
    for bad in ["{text} and again {text}".to_string(), "no input here".to_string(), format!("{{text}}{}", " w3".repeat(1400))] {
        let (status, got) = put("tpl", task(bad.clone()));
        assert_eq!(status, 400, "template of {} bytes: {got}", bad.len());
        assert!(got["error"].as_str().unwrap().contains("template"), "{got}");
    }
    let (status, got) = put("tpl", task("w3 {text} w4".into()));
    assert_eq!(status, 201, "{got}");
    assert_eq!(task_names(server.addr), ["ens", "tpl"]);
    assert!(!entries(dir.path()).iter().any(|n| n.starts_with('.')), "{:?}", entries(dir.path()));
}

/// `--max-tasks`: a new task past the cap is refused (409); replacing one is not.
#[test]
fn the_task_count_is_capped() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(&model, dir.path(), |c| c.store.max_tasks = 2);
    let body = |seed| serde_json::json!({"prompt": rows(&model, 2, seed)});
    assert_eq!(call(server.addr, "PUT", "/v1/tasks/a", Some(&body(1))).0, 201);
    assert_eq!(call(server.addr, "PUT", "/v1/tasks/b", Some(&body(2))).0, 201);
    let (status, got) = call(server.addr, "PUT", "/v1/tasks/c", Some(&body(3)));
    assert_eq!(status, 409, "{got}");
    assert!(got["error"].as_str().unwrap().contains("--max-tasks"), "{got}");
    assert_eq!(call(server.addr, "PUT", "/v1/tasks/a", Some(&body(4))).0, 200, "a replacement is no new task");
    assert_eq!(call(server.addr, "DELETE", "/v1/tasks/b", None).0, 200);
    assert_eq!(call(server.addr, "PUT", "/v1/tasks/c", Some(&body(3))).0, 201);
    assert_eq!(task_names(server.addr), ["a", "c"]);
    drop(server);
    // At start-up the folders past the cap (name order) are skipped and listed.
    write_task_folder(&dir.path().join("d"), &[tensor(&rows(&model, 2, 5))], &model, None).unwrap();
    let server = serve(&model, dir.path(), |c| c.store.max_tasks = 2);
    assert_eq!(task_names(server.addr), ["a", "c"]);
    let (_, errors) = call(server.addr, "GET", "/v1/tasks?errors", None);
    assert_eq!(errors[0]["name"], "d", "{errors}");
    assert!(errors[0]["error"].as_str().unwrap().contains("--max-tasks"), "{errors}");
}

/// A folder that cannot be served no longer stops the server: it is skipped, logged and
/// listed under `GET /v1/tasks?errors`; uploading or deleting the name clears the entry.
#[test]
fn bad_task_folders_are_skipped_and_listed() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_task_folder(&d.join("good"), &[tensor(&rows(&model, 3, 1))], &model, None).unwrap();
    std::fs::create_dir_all(d.join("broken")).unwrap();
    std::fs::write(d.join("broken/adapter_config.json"), "{not json").unwrap();
    std::fs::create_dir_all(d.join("empty")).unwrap();
    // An adapter for a model of width 16, and one whose config multiplies memory.
    let narrow = Tensor::zeros((3, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut config = AdapterConfig::new(model.backbone.info(), 3, "RANDOM");
    config.token_dim = 16;
    PeftAdapter::new(config, narrow).unwrap().save(&d.join("wide")).unwrap();
    write_task_folder(&d.join("huge"), &[tensor(&rows(&model, 3, 2))], &model, None).unwrap();
    let text = std::fs::read_to_string(d.join("huge/adapter_config.json")).unwrap();
    let text = text.replace("\"num_transformer_submodules\": 1", "\"num_transformer_submodules\": 1000000000000");
    std::fs::write(d.join("huge/adapter_config.json"), text).unwrap();
    let meta = TaskMeta { template: Some("{text} {text}".into()), ..TaskMeta::default() };
    write_task_folder(&d.join("twice"), &[tensor(&rows(&model, 3, 3))], &model, Some(&meta)).unwrap();

    let server = serve(&model, d, |_| {});
    assert_eq!(task_names(server.addr), ["good"]);
    let (status, errors) = call(server.addr, "GET", "/v1/tasks?errors", None);
    assert_eq!(status, 200);
    let listed: Vec<(&str, &str)> =
        errors.as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e["error"].as_str().unwrap())).collect();
    let names: Vec<&str> = listed.iter().map(|e| e.0).collect();
    assert_eq!(names, ["broken", "empty", "huge", "twice", "wide"]);
    for (name, why) in [("broken", "adapter_config.json"), ("empty", "no adapter_config.json"), ("huge", "num_transformer_submodules"), ("twice", "template"), ("wide", "token_dim")] {
        let error = listed.iter().find(|e| e.0 == name).unwrap().1;
        assert!(error.contains(why), "{name}: {error}");
    }
    let (status, got) = call(server.addr, "POST", "/v1/generate", Some(&serde_json::json!({"task": "good", "input": "w5 w6"})));
    assert_eq!(status, 200, "{got}");
    // A new upload replaces a bad folder; a deletion removes one.
    assert_eq!(call(server.addr, "PUT", "/v1/tasks/wide", Some(&serde_json::json!({"prompt": rows(&model, 2, 4)}))).0, 201);
    assert_eq!(call(server.addr, "DELETE", "/v1/tasks/broken", None).0, 200);
    assert!(!d.join("broken").exists());
    let (_, errors) = call(server.addr, "GET", "/v1/tasks?errors", None);
    let names: Vec<&str> = errors.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["empty", "huge", "twice"]);
    assert_eq!(task_names(server.addr), ["good", "wide"]);
    // The listing is documented: the query parameter and the shape of its answer.
    let (status, doc) = call(server.addr, "GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let get = &doc["paths"]["/v1/tasks"]["get"];
    assert_eq!(get["parameters"][0]["name"], "errors", "{get}");
    assert_eq!(get["parameters"][0]["in"], "query", "{get}");
    let shapes = get["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"].as_array().unwrap();
    assert!(shapes.iter().any(|s| s["items"]["$ref"] == "#/components/schemas/TaskError"), "{get}");
    let error_schema = &doc["components"]["schemas"]["TaskError"];
    assert_eq!(error_schema["required"], serde_json::json!(["name", "error"]), "{error_schema}");
}

/// A crash in the middle of `PUT` (replace) or `DELETE` leaves hidden folders: on start the
/// old version of a task whose new version never landed is restored, everything else left
/// over is removed.
#[test]
fn an_interrupted_replacement_is_recovered_on_start() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let task = |path: &Path, n: usize, seed: u64| {
        write_task_folder(path, &[tensor(&rows(&model, n, seed))], &model, None).unwrap();
    };
    // `a`: crashed between the two renames (served version moved aside, new one still staged).
    task(&d.join(".a.old-7-1"), 3, 1);
    task(&d.join(".a.upload-7-1"), 5, 2);
    // `b`: crashed after the new version landed, before the old one was removed.
    task(&d.join("b"), 4, 3);
    task(&d.join(".b.old-7-2"), 6, 4);
    // `c`: crashed in the middle of a deletion; `e`: an upload that never finished.
    task(&d.join(".c.deleted-9"), 2, 5);
    std::fs::create_dir_all(d.join(".e.upload-7-3")).unwrap();
    std::fs::write(d.join(".e.upload-7-3/adapter_config.json"), "{").unwrap();

    let server = serve(&model, d, |_| {});
    assert_eq!(task_names(server.addr), ["a", "b"]);
    let prompt_tokens = |name: &str| call(server.addr, "GET", &format!("/v1/tasks/{name}"), None).1["prompt_tokens"].clone();
    assert_eq!(prompt_tokens("a"), serde_json::json!([3]), "the old version of `a` is back");
    assert_eq!(prompt_tokens("b"), serde_json::json!([4]), "the new version of `b` stays");
    assert_eq!(entries(d), ["a", "b"]);
    let (_, errors) = call(server.addr, "GET", "/v1/tasks?errors", None);
    assert_eq!(errors, serde_json::json!([]));
}

/// `--kv-cache-bytes` bounds the cached prompt keys/values: past it the least recently used
/// prompt is evicted and computed again on its next use, with exactly the same answers.
#[test]
fn evicted_prompt_keys_are_recomputed_with_identical_answers() {
    let model = tiny();
    // Engine level: a budget that holds one of the two prompts.
    let (p, q) = (tensor(&rows(&model, 4, 1)), tensor(&rows(&model, 6, 2)));
    let unbounded = Arc::new(PromptKvStore::new(usize::MAX));
    let item = |prompt: &Tensor, kv: &Arc<PromptKv>, source: &[u32]| GenItem {
        prompts: vec![prompt.clone()],
        prompt_kv: vec![kv.clone()],
        source: source.to_vec(),
        params: DecodeParams::greedy(5),
        stream: None,
    };
    let run = |it: GenItem| {
        let mut count = Prefill::new(true);
        let out = engine::generate(&model, &[it], &mut count, &|_| false).unwrap().remove(0);
        (out, count)
    };
    let source = [1u32, 7, 8, 9];
    let kv_alone = Arc::new(PromptKv::new(&unbounded));
    let (p_alone, count) = run(item(&p, &kv_alone, &source));
    assert_eq!(count.computed, 4 + source.len());
    let one_prompt = unbounded.bytes(); // 2 layers x (K + V) x 2 heads x 8 x 4 positions x 4 bytes
    assert_eq!(one_prompt, 2 * 2 * 2 * 8 * 4 * 4);
    let store = Arc::new(PromptKvStore::new(one_prompt * 2));
    let (kv_p, kv_q) = (Arc::new(PromptKv::new(&store)), Arc::new(PromptKv::new(&store)));
    let (first, _) = run(item(&p, &kv_p, &source));
    run(item(&q, &kv_q, &source));
    assert!(!kv_p.is_filled() && kv_q.is_filled(), "the least recently used prompt is evicted");
    assert_eq!(store.evictions(), 1);
    assert!(store.bytes() <= one_prompt * 2);
    let (again, count) = run(item(&p, &kv_p, &source));
    assert_eq!(count.computed, 4 + source.len(), "the prompt is computed again");
    for out in [&first, &again] {
        assert_eq!(out.tokens, p_alone.tokens);
        assert_eq!(out.logprobs, p_alone.logprobs, "bit for bit");
    }

    // Over HTTP: the same requests on a server whose budget holds one prompt and on one
    // without a budget, alternating tasks so that every request evicts the other's prompt.
    let dir = tempfile::tempdir().unwrap();
    for (name, prompt) in [("p", &p), ("q", &q)] {
        let meta: TaskMeta = serde_json::from_str(LABELS).unwrap();
        write_task_folder(&dir.path().join(name), &[prompt.clone()], &model, Some(&meta)).unwrap();
    }
    let answers = |budget: usize| {
        let server = serve(&model, dir.path(), |c| c.store.kv_cache_bytes = budget);
        let mut out = Vec::new();
        for round in 0..3 {
            for task in ["p", "q"] {
                let input = format!("w{} w{}", 20 + round, 30 + round);
                for path in ["/v1/classify", "/v1/generate"] {
                    let (status, got) = call(server.addr, "POST", path, Some(&serde_json::json!({"task": task, "input": input})));
                    assert_eq!(status, 200, "{got}");
                    out.push((path, got));
                }
            }
        }
        let (_, metrics) = softprompt_serve::client::request(server.addr, "GET", "/metrics", None, None).unwrap();
        let metric = |name: &str| -> u64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /metrics"))
        };
        let computed = metric("softprompt_prefill_tokens_total{source=\"computed\"}");
        // The budget's state is visible to operators (and to the adversarial soak).
        let kv = (metric("softprompt_prompt_kv_bytes"), metric("softprompt_prompt_kv_evictions_total"));
        assert_eq!(metric("softprompt_prompt_kv_budget_bytes"), budget as u64);
        (out, computed, kv)
    };
    let (bounded, computed_bounded, (bytes_bounded, evictions_bounded)) = answers(one_prompt * 2);
    let (cached, computed_cached, (bytes_cached, evictions_cached)) = answers(usize::MAX);
    // Every task switch but the first evicts the other prompt: p, q, then 2 rounds of p, q.
    assert_eq!((evictions_bounded, evictions_cached), (5, 0));
    assert!(bytes_bounded <= (one_prompt * 2) as u64, "{bytes_bounded}");
    assert_eq!(bytes_cached, (one_prompt / 4 * (4 + 6)) as u64, "both prompts cached");
    for ((path, a), (_, b)) in bounded.iter().zip(&cached) {
        assert_same_answer("evicted vs cached", path, a, b);
        assert_eq!(a, b, "identical answers");
    }
    // The first request of each task in every round after the first recomputed its prompt.
    assert_eq!(computed_bounded - computed_cached, (3 - 1) * (4 + 6));
}
