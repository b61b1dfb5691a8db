//! The dynamic batcher: a bounded queue and one worker thread that owns the forwards.
//!
//! HTTP handlers push jobs and await a oneshot reply; they never run the model, so the
//! tokio runtime stays responsive. The worker takes the oldest job, waits until `max_batch`
//! compatible jobs are queued, their padded size reaches the token budget `max_tokens`, or
//! the oldest has waited `max_wait`, and runs them as one batch (at most `max_batch` jobs and
//! `max_tokens` padded positions; a job alone never exceeds the budget: `limits::check_cost`
//! refuses it first; see [`Cost`]). Compatible means: same kind (generate or classify), and
//! - with `one_task_per_batch`: the same task (the baseline the load generator compares to);
//! - for generation with absolute position embeddings (GPT-2): the same row lengths, so
//!   rows need no padding and every request sees exactly the input it would see alone (see
//!   `engine`; classification pads on the right, which changes no position). Rotary models
//!   mix any lengths, and so do encoder-decoder models (T5: relative
//!   positions, right-padded encoder rows; see `seq2seq`).
//!
//! Requests whose client has gone (disconnect, timeout) are dropped: before a batch starts;
//! during generation at every step (`finish_reason` `cancelled`); during classification
//! between groups of at most `max_rows` rows.

use crate::engine::{self, ClsItem, ClsOutput, GenItem, GenOutput};
use crate::error::ApiError;
use crate::limits::Cost;
use crate::metrics::Metrics;
use crate::seq2seq;
use axum::http::StatusCode;
use softprompt::load::Model;
use softprompt::model::Arch;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// Most requests in one batch.
    pub max_batch: usize,
    /// Longest time the oldest queued request waits for company.
    pub max_wait: Duration,
    /// Most requests waiting; more are refused with 429.
    pub queue: usize,
    /// Restrict each batch to one task (no mixing; for comparison).
    pub one_task_per_batch: bool,
    /// Most rows (request x prompt x label) per classification forward.
    pub max_rows: usize,
    /// Most padded token positions per batch (rows x longest row, see [`Cost`]): bounds the
    /// memory and time of one batch, whatever mix of short and long requests is queued.
    pub max_tokens: usize,
    /// Decoder-only models: start each batch from the prompts' keys/values computed once per
    /// prompt instead of running the prompts again (see `engine`; off only for comparison).
    pub reuse_prompt_kv: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 16,
            max_wait: Duration::from_millis(5),
            queue: 256,
            one_task_per_batch: false,
            max_rows: 64,
            max_tokens: 8192,
            reuse_prompt_kv: true,
        }
    }
}

pub enum Work {
    Generate(GenItem),
    Classify(ClsItem),
}

impl Work {
    pub fn cost(&self) -> Cost {
        match self {
            Work::Generate(g) => Cost::generate(g),
            Work::Classify(c) => Cost::classify(c),
        }
    }
}

pub enum Reply {
    Generate(GenOutput),
    Classify(ClsOutput),
}

pub type ReplyResult = Result<Reply, ApiError>;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    generate: bool,
    /// Row lengths that must match exactly (absolute-position models only).
    lens: Option<Vec<usize>>,
    task: Option<String>,
}

struct Job {
    task: String,
    key: Key,
    cost: Cost,
    work: Work,
    enqueued: Instant,
    reply: oneshot::Sender<ReplyResult>,
}

struct Queue {
    jobs: VecDeque<Job>,
    shutdown: bool,
    /// Seconds of worker time per request (batch time / batch size), averaged over recent
    /// batches; `None` before the first batch.
    per_request: Option<f64>,
}

pub struct Batcher {
    cfg: BatchConfig,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    exact_positions: bool,
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Batcher {
    pub fn new(cfg: BatchConfig, model: Arc<Model>, metrics: Arc<Metrics>) -> Self {
        let exact_positions = model.backbone.info().arch == Arch::Gpt2;
        Batcher {
            cfg,
            model,
            metrics,
            exact_positions,
            queue: Mutex::new(Queue { jobs: VecDeque::new(), shutdown: false, per_request: None }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests waiting (not counting the batch being run).
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// About how long a request queued now would wait: the requests waiting times the
    /// recent worker time per request (`None` before the first batch). Generation and
    /// classification share one average, so it is rough for a mix of both.
    pub fn expected_wait(&self) -> Option<Duration> {
        let q = self.lock();
        q.per_request.map(|per| Duration::from_secs_f64(per * q.jobs.len() as f64))
    }

    /// Queues a job; 429 when the queue is full, 503 when shutting down.
    pub fn submit(&self, task: &str, work: Work) -> Result<oneshot::Receiver<ReplyResult>, ApiError> {
        let lens = match &work {
            Work::Generate(g) if self.exact_positions => {
                let mut l: Vec<usize> = g.prompts.iter().map(|p| p.dim(0).unwrap_or(0) + g.source.len()).collect();
                l.sort_unstable();
                l.dedup();
                Some(l)
            }
            // Classification rows are padded on the right, which no position scheme notices.
            _ => None,
        };
        let same_task = self.cfg.one_task_per_batch;
        let key = Key {
            generate: matches!(work, Work::Generate(_)),
            lens,
            task: same_task.then(|| task.to_string()),
        };
        let (tx, rx) = oneshot::channel();
        let mut q = self.lock();
        if q.shutdown {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
        }
        if q.jobs.len() >= self.cfg.queue {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the queue is full ({} requests waiting); retry later", q.jobs.len()),
            ));
        }
        let cost = work.cost();
        q.jobs.push_back(Job { task: task.to_string(), key, cost, work, enqueued: Instant::now(), reply: tx });
        drop(q);
        self.wake.notify_all();
        Ok(rx)
    }

    /// Refuses new jobs; the worker finishes what is queued, then returns.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.wake.notify_all();
    }

    /// The worker loop (run it on a dedicated thread).
    pub fn run(&self) {
        loop {
            let batch = {
                let mut q = self.lock();
                while q.jobs.is_empty() {
                    if q.shutdown {
                        return;
                    }
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                let key = q.jobs[0].key.clone();
                let deadline = q.jobs[0].enqueued + self.cfg.max_wait;
                loop {
                    let now = Instant::now();
                    if self.batch_is_full(&q.jobs, &key) || q.shutdown || now >= deadline {
                        break;
                    }
                    q = self.wake.wait_timeout(q, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                let mut batch: Vec<Job> = Vec::new();
                let mut cost = Cost::default();
                let mut rest = VecDeque::with_capacity(q.jobs.len());
                while let Some(j) = q.jobs.pop_front() {
                    let with = cost.and(j.cost);
                    let fits = batch.is_empty() || with.padded() <= self.cfg.max_tokens;
                    if j.key == key && batch.len() < self.cfg.max_batch && fits {
                        cost = with;
                        batch.push(j);
                    } else {
                        rest.push_back(j);
                    }
                }
                q.jobs = rest;
                batch
            };
            // Requests whose client gave up (timeout, disconnect) are not run.
            let (batch, gone): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| !j.reply.is_closed());
            self.metrics.cancelled(gone.len());
            if batch.is_empty() {
                continue;
            }
            self.run_batch(batch);
        }
    }

    /// Whether the queued jobs compatible with `key` already fill a batch: `max_batch` of
    /// them, or more padded positions than the token budget.
    fn batch_is_full(&self, jobs: &VecDeque<Job>, key: &Key) -> bool {
        let mut n = 0;
        let mut cost = Cost::default();
        for j in jobs.iter().filter(|j| &j.key == key) {
            n += 1;
            cost = cost.and(j.cost);
            if n >= self.cfg.max_batch || cost.padded() >= self.cfg.max_tokens {
                return true;
            }
        }
        false
    }

    /// Classifies `items` in groups of at most `max_rows` rows (one item at least), leaving
    /// out before each group the items whose client has gone (`None`), so that a big batch
    /// stops costing time soon after its clients leave.
    fn classify_groups(
        &self,
        items: Vec<ClsItem>,
        cancelled: &dyn Fn(usize) -> bool,
        prefill: &mut engine::Prefill,
    ) -> softprompt::Result<Vec<Option<ClsOutput>>> {
        let model = &self.model;
        let max_rows = self.cfg.max_rows.max(1);
        let mut outs: Vec<Option<ClsOutput>> = (0..items.len()).map(|_| None).collect();
        let mut items = items.into_iter().enumerate().peekable();
        while items.peek().is_some() {
            let (mut index, mut group, mut rows) = (Vec::new(), Vec::new(), 0);
            while let Some((i, item)) = items.next_if(|(_, it)| group.is_empty() || rows + Cost::classify(it).rows <= max_rows) {
                if !cancelled(i) {
                    rows += Cost::classify(&item).rows;
                    index.push(i);
                    group.push(item);
                }
            }
            if group.is_empty() {
                continue;
            }
            let results = if model.backbone.info().is_encoder_decoder() {
                seq2seq::classify(model, &group, max_rows)?
            } else {
                engine::classify(model, &group, max_rows, prefill)?
            };
            for (i, out) in index.into_iter().zip(results) {
                outs[i] = Some(out);
            }
        }
        Ok(outs)
    }

    fn run_batch(&self, batch: Vec<Job>) {
        let start = Instant::now();
        let size = batch.len();
        let mut tasks: Vec<&str> = batch.iter().map(|j| j.task.as_str()).collect();
        tasks.sort_unstable();
        tasks.dedup();
        let n_tasks = tasks.len();
        let mut replies = Vec::with_capacity(size);
        let mut gens = Vec::new();
        let mut clss = Vec::new();
        for j in batch {
            replies.push(j.reply);
            match j.work {
                Work::Generate(g) => gens.push(g),
                Work::Classify(c) => clss.push(c),
            }
        }
        let model = &self.model;
        let mut prefill = engine::Prefill::new(self.cfg.reuse_prompt_kv);
        // A batch holds one kind of job, so item `i` answers `replies[i]`.
        let cancelled = |i: usize| replies[i].is_closed();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> softprompt::Result<Vec<Option<Reply>>> {
            if !gens.is_empty() {
                let outs = if model.backbone.info().is_encoder_decoder() {
                    seq2seq::generate(model, &gens, &cancelled)?
                } else {
                    engine::generate(model, &gens, &mut prefill, &cancelled)?
                };
                Ok(outs.into_iter().map(|o| Some(Reply::Generate(o))).collect())
            } else {
                let outs = self.classify_groups(std::mem::take(&mut clss), &cancelled, &mut prefill)?;
                Ok(outs.into_iter().map(|o| o.map(Reply::Classify)).collect())
            }
        }));
        let result = match result {
            Ok(r) => r.map_err(|e| ApiError::internal(format!("model error: {e}"))),
            Err(_) => Err(ApiError::internal("the model worker panicked on this batch")),
        };
        // Record the batch before answering, so a client that reads /metrics right after its
        // reply sees the batch that produced it.
        let tokens: usize = match &result {
            Ok(outs) => outs
                .iter()
                .map(|out| match out {
                    Some(Reply::Generate(g)) => g.tokens.len(),
                    _ => 0,
                })
                .sum(),
            Err(_) => 0,
        };
        self.metrics.batch(size, n_tasks, tokens, start.elapsed().as_secs_f64());
        {
            let per = start.elapsed().as_secs_f64() / size as f64;
            let mut q = self.lock();
            q.per_request = Some(q.per_request.map_or(per, |p| 0.8 * p + 0.2 * per));
        }
        self.metrics.prefill(prefill.computed, prefill.reused);
        match result {
            Ok(outs) => {
                let gone = outs.iter().filter(|o| o.is_none()).count();
                self.metrics.cancelled(gone);
                // A request left out (its client gone) gets no answer: its sender is dropped.
                for (tx, out) in replies.into_iter().zip(outs) {
                    if let Some(out) = out {
                        let _ = tx.send(Ok(out));
                    }
                }
            }
            Err(e) => {
                tracing::error!("batch of {size}: {e}");
                for tx in replies {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}
