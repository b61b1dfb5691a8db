//! Prometheus text metrics, kept by hand (a handful of counters and histograms).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram { bounds: bounds.to_vec(), counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, x: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if x <= *b {
                *c += 1;
            }
        }
        self.sum += x;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

const LATENCY_BOUNDS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const BATCH_BOUNDS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    batch_size: Histogram,
    batch_tasks: Histogram,
    batches: u64,
    generated_tokens: u64,
    tokens_per_second: f64,
    prefill_computed: u64,
    prefill_reused: u64,
    rejected_full: u64,
    timeouts: u64,
    cancelled: u64,
    connections_open: u64,
    connections_refused: u64,
}

/// The prompt-KV store's state at the time of a `/metrics` request.
#[derive(Clone, Copy, Debug, Default)]
pub struct PromptKvGauges {
    pub bytes: usize,
    pub budget: usize,
    pub evictions: u64,
}

pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                batch_size: Histogram::new(&BATCH_BOUNDS),
                batch_tasks: Histogram::new(&BATCH_BOUNDS),
                batches: 0,
                generated_tokens: 0,
                tokens_per_second: 0.0,
                prefill_computed: 0,
                prefill_reused: 0,
                rejected_full: 0,
                timeouts: 0,
                cancelled: 0,
                connections_open: 0,
                connections_refused: 0,
            }),
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One finished HTTP request.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        let mut m = self.lock();
        *m.requests.entry((endpoint.to_string(), status)).or_default() += 1;
        m.latency
            .entry(endpoint.to_string())
            .or_insert_with(|| Histogram::new(&LATENCY_BOUNDS))
            .observe(seconds);
        if status == 429 {
            m.rejected_full += 1;
        }
        if status == 504 {
            m.timeouts += 1;
        }
    }

    /// One batch run by the worker: its size, distinct tasks, generated tokens and duration.
    pub fn batch(&self, size: usize, tasks: usize, tokens: usize, seconds: f64) {
        let mut m = self.lock();
        m.batches += 1;
        m.batch_size.observe(size as f64);
        m.batch_tasks.observe(tasks as f64);
        m.generated_tokens += tokens as u64;
        if tokens > 0 && seconds > 0.0 {
            m.tokens_per_second = tokens as f64 / seconds;
        }
    }

    /// Prefill positions of one batch: run through the model (prompt caches filled on the way
    /// included), and prompt positions taken from cached keys/values.
    pub fn prefill(&self, computed: usize, reused: usize) {
        let mut m = self.lock();
        m.prefill_computed += computed as u64;
        m.prefill_reused += reused as u64;
    }

    /// Queued requests dropped by the worker because their client had gone.
    pub fn cancelled(&self, n: usize) {
        self.lock().cancelled += n as u64;
    }

    /// A connection accepted (`true`) or closed (`false`).
    pub fn connection(&self, open: bool) {
        let mut m = self.lock();
        m.connections_open = if open { m.connections_open + 1 } else { m.connections_open.saturating_sub(1) };
    }

    /// A connection refused with 503 because `--max-connections` were open.
    pub fn connection_refused(&self) {
        self.lock().connections_refused += 1;
    }

    pub fn render(&self, queue_depth: usize, n_tasks: usize, prompt_kv: PromptKvGauges) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# HELP softprompt_queue_depth Requests waiting for the batcher.");
        let _ = writeln!(out, "# TYPE softprompt_queue_depth gauge");
        let _ = writeln!(out, "softprompt_queue_depth {queue_depth}");
        let _ = writeln!(out, "# HELP softprompt_tasks Tasks being served.");
        let _ = writeln!(out, "# TYPE softprompt_tasks gauge");
        let _ = writeln!(out, "softprompt_tasks {n_tasks}");
        // The prompt-KV budget (`--kv-cache-bytes`): what is cached now and how often it evicted.
        let _ = writeln!(out, "# HELP softprompt_prompt_kv_bytes Bytes of cached prompt keys/values.");
        let _ = writeln!(out, "# TYPE softprompt_prompt_kv_bytes gauge");
        let _ = writeln!(out, "softprompt_prompt_kv_bytes {}", prompt_kv.bytes);
        let _ = writeln!(out, "# HELP softprompt_prompt_kv_budget_bytes Most bytes of cached prompt keys/values (--kv-cache-bytes).");
        let _ = writeln!(out, "# TYPE softprompt_prompt_kv_budget_bytes gauge");
        let _ = writeln!(out, "softprompt_prompt_kv_budget_bytes {}", prompt_kv.budget);
        let _ = writeln!(out, "# HELP softprompt_prompt_kv_evictions_total Prompts whose cached keys/values were evicted (least recently used first) to stay within the budget.");
        let _ = writeln!(out, "# TYPE softprompt_prompt_kv_evictions_total counter");
        let _ = writeln!(out, "softprompt_prompt_kv_evictions_total {}", prompt_kv.evictions);
        let _ = writeln!(out, "# HELP softprompt_requests_total HTTP requests by endpoint and status.");
        let _ = writeln!(out, "# TYPE softprompt_requests_total counter");
        for ((e, s), c) in &m.requests {
            let _ = writeln!(out, "softprompt_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {c}");
        }
        let _ = writeln!(out, "# HELP softprompt_request_duration_seconds Request latency by endpoint.");
        let _ = writeln!(out, "# TYPE softprompt_request_duration_seconds histogram");
        for (e, h) in &m.latency {
            h.render(&mut out, "softprompt_request_duration_seconds", &format!("endpoint=\"{e}\""));
        }
        let _ = writeln!(out, "# HELP softprompt_batch_size Requests per forward batch.");
        let _ = writeln!(out, "# TYPE softprompt_batch_size histogram");
        m.batch_size.render(&mut out, "softprompt_batch_size", "");
        let _ = writeln!(out, "# HELP softprompt_batch_tasks Distinct tasks per forward batch.");
        let _ = writeln!(out, "# TYPE softprompt_batch_tasks histogram");
        m.batch_tasks.render(&mut out, "softprompt_batch_tasks", "");
        let _ = writeln!(out, "# HELP softprompt_batches_total Batches run.");
        let _ = writeln!(out, "# TYPE softprompt_batches_total counter");
        let _ = writeln!(out, "softprompt_batches_total {}", m.batches);
        let _ = writeln!(out, "# HELP softprompt_generated_tokens_total Tokens generated.");
        let _ = writeln!(out, "# TYPE softprompt_generated_tokens_total counter");
        let _ = writeln!(out, "softprompt_generated_tokens_total {}", m.generated_tokens);
        let _ = writeln!(
            out,
            "# HELP softprompt_prefill_tokens_total Prefill positions (pads not counted): computed by the model, or reused from a prompt's cached keys/values."
        );
        let _ = writeln!(out, "# TYPE softprompt_prefill_tokens_total counter");
        let _ = writeln!(out, "softprompt_prefill_tokens_total{{source=\"computed\"}} {}", m.prefill_computed);
        let _ = writeln!(out, "softprompt_prefill_tokens_total{{source=\"reused\"}} {}", m.prefill_reused);
        let _ = writeln!(out, "# HELP softprompt_tokens_per_second Generation throughput of the last generation batch.");
        let _ = writeln!(out, "# TYPE softprompt_tokens_per_second gauge");
        let _ = writeln!(out, "softprompt_tokens_per_second {}", m.tokens_per_second);
        let _ = writeln!(out, "# HELP softprompt_rejected_total Requests refused because the queue was full.");
        let _ = writeln!(out, "# TYPE softprompt_rejected_total counter");
        let _ = writeln!(out, "softprompt_rejected_total {}", m.rejected_full);
        let _ = writeln!(out, "# HELP softprompt_timeouts_total Requests that ran past the per-request timeout.");
        let _ = writeln!(out, "# TYPE softprompt_timeouts_total counter");
        let _ = writeln!(out, "softprompt_timeouts_total {}", m.timeouts);
        let _ = writeln!(out, "# HELP softprompt_cancelled_total Requests dropped before or during their batch because the client had gone.");
        let _ = writeln!(out, "# TYPE softprompt_cancelled_total counter");
        let _ = writeln!(out, "softprompt_cancelled_total {}", m.cancelled);
        let _ = writeln!(out, "# HELP softprompt_connections_open Open client connections.");
        let _ = writeln!(out, "# TYPE softprompt_connections_open gauge");
        let _ = writeln!(out, "softprompt_connections_open {}", m.connections_open);
        let _ = writeln!(out, "# HELP softprompt_connections_refused_total Connections answered 503 and closed at the --max-connections cap.");
        let _ = writeln!(out, "# TYPE softprompt_connections_refused_total counter");
        let _ = writeln!(out, "softprompt_connections_refused_total {}", m.connections_refused);
        out
    }
}
