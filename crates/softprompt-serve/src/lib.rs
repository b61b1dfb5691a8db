//! softprompt-serve: many soft prompts on one frozen model over HTTP.
//!
//! One model is loaded once; every task is a PEFT prompt-tuning adapter (or an ensemble of
//! them) in a folder. Requests are queued for a dynamic batcher running on its own thread,
//! which packs requests of different tasks into one forward pass by giving every row its
//! own prompt (see [`engine`] for the padding layout and why it leaves results unchanged).
//! Decoder-only models (Llama family, GPT-2) run through [`engine`], encoder-decoder models
//! (T5, flan-T5: the prompt before the encoder input) through [`seq2seq`].
//!
//! Endpoints: `POST /v1/generate`, `POST /v1/classify`, `GET /v1/tasks`,
//! `GET /v1/tasks?errors` (task folders that could not be served),
//! `GET|PUT|DELETE /v1/tasks/{name}`, `GET /health`, `GET /metrics`, `GET /openapi.json`;
//! OpenAI-compatible ([`openai`]): `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`.
//!
//! At the boundary, before any work: [`connections`] (connection cap, header timeout),
//! [`access`] (Host allow-list, token, write access), [`body`] (media type, size, body
//! deadline), [`limits`] (input characters and tokens, stop strings, the request's model
//! work against the per-batch token budget).

pub mod access;
pub mod batcher;
pub mod body;
pub mod client;
pub mod connections;
pub mod engine;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod registry;
pub mod seq2seq;

pub use batcher::BatchConfig;
pub use error::ApiError;

use softprompt::load::Model;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Server settings (the CLI flags).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Folder of task folders; uploads are written here.
    pub prompts_dir: PathBuf,
    pub addr: SocketAddr,
    pub batch: BatchConfig,
    /// Bearer token required on every endpoint but `/health` (which then shows model details
    /// only to requests carrying it).
    pub token: Option<String>,
    /// Uploads and deletions without a token (otherwise PUT/DELETE need `token`: 403).
    pub allow_writes: bool,
    /// `Host` header values accepted besides the loopback names (`localhost`, `127.0.0.1`,
    /// `[::1]` with the port), which are accepted when listening on loopback. With the list
    /// empty and a non-loopback address every `Host` is accepted. See [`access`].
    pub allowed_hosts: Vec<String>,
    /// Largest request body (413 above); generate/classify bodies are also held to the
    /// largest valid request, [`limits::InputLimits::body_bytes`].
    pub max_body_bytes: usize,
    /// Largest `max_new_tokens` a request may ask for (400 above).
    pub max_new_tokens: usize,
    /// What one generate/classify request may ask for (413 above).
    pub input: limits::InputLimits,
    /// Time a request may wait for its answer, queueing included (504 after).
    pub request_timeout: Duration,
    /// Connections, header and body read timeouts.
    pub connections: connections::ConnectionLimits,
    /// Task count, prompt rows per task and prompt-cache bytes (`--max-tasks`,
    /// `--max-prompt-tokens`, `--kv-cache-bytes`).
    pub store: registry::StoreLimits,
}

impl ServeConfig {
    pub fn new(prompts_dir: impl Into<PathBuf>) -> Self {
        ServeConfig {
            prompts_dir: prompts_dir.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            batch: BatchConfig::default(),
            token: None,
            allow_writes: false,
            allowed_hosts: Vec::new(),
            max_body_bytes: 16 << 20,
            max_new_tokens: 256,
            input: limits::InputLimits::default(),
            request_timeout: Duration::from_secs(60),
            connections: connections::ConnectionLimits::default(),
            store: registry::StoreLimits::default(),
        }
    }
}

/// A running server: its address, and the handle to stop it.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Starts serving `model` on `cfg.addr` (port 0: an ephemeral port; see `addr`) until
    /// [`Server::shutdown`] is called.
    pub fn start(model: Arc<Model>, cfg: ServeConfig) -> softprompt::Result<Server> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = Self::start_until(model, cfg, async move {
            let _ = rx.await;
        })?;
        server.stop = Some(tx);
        Ok(server)
    }

    /// Starts serving until `stop` completes; then in-flight requests are finished, the
    /// batcher drains its queue and the server thread ends.
    pub fn start_until(
        model: Arc<Model>,
        mut cfg: ServeConfig,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> softprompt::Result<Server> {
        model.tokenizer()?;
        let registry = Arc::new(registry::Registry::load(&cfg.prompts_dir, &model, cfg.store.clone())?);
        let metrics = Arc::new(metrics::Metrics::default());
        let batcher = Arc::new(batcher::Batcher::new(cfg.batch.clone(), model.clone(), metrics.clone()));
        let listener = std::net::TcpListener::bind(cfg.addr)
            .map_err(|e| softprompt::Error::invalid(format!("cannot listen on {}: {e}", cfg.addr)))?;
        listener.set_nonblocking(true).map_err(|e| softprompt::Error::invalid(e.to_string()))?;
        let addr = listener.local_addr().map_err(|e| softprompt::Error::invalid(e.to_string()))?;
        // The port actually bound (port 0: an ephemeral one), which the Host check expects.
        cfg.addr = addr;
        let limits = cfg.connections.clone();
        let state = Arc::new(http::AppState { model, registry, batcher: batcher.clone(), metrics: metrics.clone(), cfg });
        let worker = {
            let b = batcher.clone();
            std::thread::Builder::new()
                .name("softprompt-batcher".into())
                .spawn(move || b.run())
                .map_err(|e| softprompt::Error::invalid(format!("cannot start the worker: {e}")))?
        };
        let thread = std::thread::Builder::new()
            .name("softprompt-http".into())
            .spawn(move || -> std::io::Result<()> {
                // Parsing and tokenisation run on the blocking pool (`http`); its threads are
                // capped so that a flood of large requests queues instead of adding threads.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .max_blocking_threads(16)
                    .enable_all()
                    .build()?;
                let result = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    connections::serve(listener, http::router(state), limits, metrics, stop).await;
                    std::io::Result::Ok(())
                });
                batcher.shutdown();
                let _ = worker.join();
                result
            })
            .map_err(|e| softprompt::Error::invalid(format!("cannot start the server: {e}")))?;
        Ok(Server { addr, stop: None, thread: Some(thread) })
    }

    /// Stops accepting connections, finishes in-flight requests and waits for the end.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.wait()
    }

    /// Waits until the server ends (its stop future completed).
    pub fn wait(mut self) -> std::io::Result<()> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err(std::io::Error::other("server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
