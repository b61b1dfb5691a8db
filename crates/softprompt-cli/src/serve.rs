//! `softprompt serve`: many soft prompts on one frozen model over HTTP (see softprompt-serve).

use anyhow::{Context, Result};
use clap::Args;
use softprompt_serve::{shutdown_signal, ServeConfig, Server};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// Model folder, GGUF file, or a known name (`smollm2`).
    #[arg(long)]
    pub model: String,
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
    /// Require `Authorization: Bearer <TOKEN>` (all endpoints but /health).
    #[arg(long, env = "SOFTPROMPT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Largest max_new_tokens a request may ask for (400 above).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
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
    if args.max_batch == 0 || args.queue == 0 {
        anyhow::bail!("--max-batch and --queue must be at least 1");
    }
    if args.max_tasks == 0 || args.max_prompt_tokens == 0 {
        anyhow::bail!("--max-tasks and --max-prompt-tokens must be at least 1");
    }
    let device = crate::common::device()?;
    let model = crate::common::load(&args.model, &device)?;
    let mut cfg = ServeConfig::new(&args.prompts);
    cfg.addr = args.addr;
    cfg.batch.max_batch = args.max_batch;
    cfg.batch.max_wait = Duration::from_millis(args.max_wait_ms);
    cfg.batch.queue = args.queue;
    cfg.batch.one_task_per_batch = args.one_task_per_batch;
    cfg.token = args.token.filter(|t| !t.is_empty());
    cfg.max_body_bytes = args.max_body_bytes;
    cfg.max_new_tokens = args.max_new_tokens;
    cfg.request_timeout = Duration::from_millis(args.timeout_ms);
    cfg.store.max_tasks = args.max_tasks;
    cfg.store.max_prompt_tokens = args.max_prompt_tokens;
    cfg.store.kv_cache_bytes = args.kv_cache_bytes;
    if !args.addr.ip().is_loopback() && cfg.token.is_none() {
        eprintln!("warning: listening on {} without a token (--token or SOFTPROMPT_TOKEN)", args.addr);
    }
    let server = Server::start_until(Arc::new(model), cfg, shutdown_signal())
        .with_context(|| format!("starting the server with prompts from {}", args.prompts.display()))?;
    eprintln!("serving on http://{} (API: /openapi.json); ctrl-c to stop", server.addr);
    server.wait().context("server")?;
    eprintln!("stopped");
    Ok(())
}
