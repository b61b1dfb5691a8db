//! `softprompt serve`: many soft prompts on one frozen model over HTTP (see softprompt-serve).

use anyhow::{Context, Result};
use clap::Args;
use softprompt_serve::{shutdown_signal, ServeConfig, Server};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use softprompt::load::WeightStorage;

#[derive(Args)]
pub struct ServeArgs {
    /// Model folder, GGUF file, or a known name (`smollm2`).
    #[arg(long)]
    pub model: String,
    /// How the frozen weights are kept in memory: `stored` (GGUF blocks as the file stores
    /// them, dequantised one matrix at a time when a product runs; same results, a fraction
    /// of the memory; generation steps multiply the quantised blocks directly) or `f32` (all
    /// dequantised at load). Default f32 for serving: candle's quantised decode is still
    /// slower than the f32 path on this project's CPUs (docs/performance.md).
    #[arg(long, value_enum, default_value_t = WeightStorage::F32)]
    pub weights: WeightStorage,
    /// Folder of tasks: one adapter folder per task (or adapters in its subfolders: an
    /// ensemble), each with task.json for templates and labels. Uploads are written here.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Most requests in one forward batch.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Longest time a request waits for others to batch with (milliseconds).
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Most requests waiting; more get 429.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Require `Authorization: Bearer <TOKEN>` (all endpoints but /health, which then shows
    /// the model only with it). Also turns uploads and deletions on.
    #[arg(long, env = "SOFTPROMPT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Allow uploads and deletions (PUT/DELETE /v1/tasks/NAME) without a token.
    #[arg(long)]
    pub allow_writes: bool,
    /// A `Host` header value to accept besides localhost/127.0.0.1/[::1] with the port
    /// (NAME or NAME:PORT; repeatable). On loopback other names are refused (DNS rebinding);
    /// on other addresses, once given, only the listed names are accepted.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Largest upload body in bytes (413 above).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Largest max_new_tokens a request may ask for (400 above).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Most characters in one input, checked before tokenizing (413 above).
    #[arg(long, default_value_t = 32_768)]
    pub max_input_chars: usize,
    /// Most tokens in one input with its template, for every model (413 above).
    #[arg(long, default_value_t = 2048)]
    pub max_input_tokens: usize,
    /// Most padded token positions (rows x longest row) per batch; a request needing more
    /// alone gets 413.
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Most open connections; more are answered 503 and closed.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Time a client has to send a request's headers, in milliseconds (then closed).
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's body, in milliseconds (408 after).
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// Per-request timeout in milliseconds, queueing included (504 after).
    #[arg(long, default_value_t = 60_000)]
    pub timeout_ms: u64,
    /// Restrict each batch to one task (no cross-task batching).
    #[arg(long)]
    pub one_task_per_batch: bool,
    /// Most tasks served; uploading one more is refused (409).
    #[arg(long, default_value_t = 1000)]
    pub max_tasks: usize,
    /// Most prompt rows (soft tokens) of one task, ensemble members together.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_tokens: usize,
    /// Most bytes of cached prompt keys/values; least recently used prompts are evicted
    /// (and recomputed when next used).
    #[arg(long, default_value_t = 1 << 30)]
    pub kv_cache_bytes: usize,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_batch == 0 || args.queue == 0 || args.max_connections == 0 {
        anyhow::bail!("--max-batch, --queue and --max-connections must be at least 1");
    }
    if args.max_input_chars == 0 || args.max_input_tokens == 0 || args.max_batch_tokens == 0 {
        anyhow::bail!("--max-input-chars, --max-input-tokens and --max-batch-tokens must be at least 1");
    }
    if args.header_timeout_ms == 0 || args.body_timeout_ms == 0 {
        anyhow::bail!("--header-timeout-ms and --body-timeout-ms must be at least 1");
    }
    if args.max_tasks == 0 || args.max_prompt_tokens == 0 {
        anyhow::bail!("--max-tasks and --max-prompt-tokens must be at least 1");
    }
    let device = crate::common::device()?;
    let model = crate::common::load_generating(&args.model, &device, args.weights)?;
    let mut cfg = ServeConfig::new(&args.prompts);
    cfg.addr = args.addr;
    cfg.batch.max_batch = args.max_batch;
    cfg.batch.max_wait = Duration::from_millis(args.max_wait_ms);
    cfg.batch.queue = args.queue;
    cfg.batch.one_task_per_batch = args.one_task_per_batch;
    cfg.batch.max_tokens = args.max_batch_tokens;
    cfg.token = args.token.filter(|t| !t.is_empty());
    cfg.allow_writes = args.allow_writes;
    cfg.allowed_hosts = args.allowed_hosts;
    cfg.max_body_bytes = args.max_body_bytes;
    cfg.max_new_tokens = args.max_new_tokens;
    cfg.input.max_input_chars = args.max_input_chars;
    cfg.input.max_input_tokens = args.max_input_tokens;
    cfg.request_timeout = Duration::from_millis(args.timeout_ms);
    cfg.connections.max_connections = args.max_connections;
    cfg.connections.header_timeout = Duration::from_millis(args.header_timeout_ms);
    cfg.connections.body_timeout = Duration::from_millis(args.body_timeout_ms);
    cfg.store.max_tasks = args.max_tasks;
    cfg.store.max_prompt_tokens = args.max_prompt_tokens;
    cfg.store.kv_cache_bytes = args.kv_cache_bytes;
    if !args.addr.ip().is_loopback() && cfg.token.is_none() {
        eprintln!("warning: listening on {} without a token (--token or SOFTPROMPT_TOKEN)", args.addr);
        if cfg.allow_writes {
            eprintln!("warning: --allow-writes without a token: anyone who reaches {} can upload and delete tasks", args.addr);
        }
    }
    let server = Server::start_until(Arc::new(model), cfg, shutdown_signal())
        .with_context(|| format!("starting the server with prompts from {}", args.prompts.display()))?;
    eprintln!("serving on http://{} (API: /openapi.json); ctrl-c to stop", server.addr);
    server.wait().context("server")?;
    eprintln!("stopped");
    Ok(())
}
