//! The serving engine of one generation model: a loop on its own thread that owns the model's
//! KV cache and runs batched steps, with continuous batching across adapter sets.
//!
//! A submitted [`Job`] waits in a bounded queue, fair across tenants (round-robin: each tenant's
//! oldest job in turn). It is admitted while fewer than `max_batch` sequences run and the KV
//! cache can reserve its whole length. Every step runs the next token of each decoding sequence
//! plus chunks of prompts under a per-step token budget (chunked prefill), all in one
//! [`Llama::step`], whatever their deltas; then each sequence samples, streams its text to its
//! [`Sink`], and a finished, cancelled or expired sequence returns its cache blocks at once.
//! Deadlines and cancellation are checked at every step, prefill chunks included.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::device::bind_to_thread;
use super::error::{EngineError, Result};
use super::generate::{Decoder, FinishReason, check_prompt};
use super::host;
use super::kv::{KvPool, SeqCache};
use super::linear::LoadedDelta;
use super::llama::StepSeq;
use super::models::TextModel;
use super::sampling::{SamplingParams, TokenLogprob};
use super::telemetry;

/// Limits of one engine loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Jobs that may wait; a submission beyond it is refused.
    pub max_queue: usize,
    /// Sequences running at once.
    pub max_batch: usize,
    /// Tokens one step may run (decode tokens plus prefill chunks).
    pub step_tokens: usize,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_queue: 512,
            max_batch: 32,
            step_tokens: 256,
            kv_cache_bytes: 1 << 30,
        }
    }
}

/// How a finished generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub prompt_tokens: usize,
    /// Generated tokens, not counting an end-of-sequence token.
    pub completion_tokens: usize,
    pub finish: FinishReason,
}

/// Where a job's output goes. Called from the engine thread; must not block.
pub trait Sink: Send {
    /// A generated token (not an end-of-sequence token): the text it made final (may be empty)
    /// and its log-probabilities when asked for; `false` when the consumer has gone away. The
    /// text held back until generation ended comes last, without a token.
    fn token(&mut self, text: &str, logprob: Option<TokenLogprob>) -> bool;
    /// Whether the consumer has gone away.
    fn closed(&self) -> bool;
    fn done(self: Box<Self>, done: Done);
    fn failed(self: Box<Self>, error: EngineError);
}

/// A generation request for the engine.
pub struct Job {
    /// Fairness key: admission takes tenants in turn.
    pub tenant: String,
    /// What the request asked for (its `model` string), reported in [`EngineStats`].
    pub label: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub delta: Option<Arc<LoadedDelta>>,
    pub deadline: Instant,
    pub sink: Box<dyn Sink>,
}

/// A snapshot of the engine for metrics and routing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub waiting: usize,
    pub running: usize,
    /// Reserved share of the KV cache, `0..=1`.
    pub kv_usage: f64,
    /// Labels of running and waiting jobs (distinct, sorted).
    pub running_labels: Vec<String>,
    pub waiting_labels: Vec<String>,
    pub max_batch: usize,
    /// Bytes the base model's weights hold in memory, where known.
    pub weight_bytes: Option<usize>,
}

/// Jobs waiting for admission, one queue per tenant, taken in turn.
#[derive(Default)]
struct Waiting {
    tenants: VecDeque<(String, VecDeque<(Job, Instant)>)>,
    len: usize,
}

impl Waiting {
    fn push(&mut self, job: Job) {
        let now = Instant::now();
        match self.tenants.iter_mut().find(|(t, _)| *t == job.tenant) {
            Some((_, jobs)) => jobs.push_back((job, now)),
            None => {
                let tenant = job.tenant.clone();
                self.tenants
                    .push_back((tenant, VecDeque::from([(job, now)])));
            }
        }
        self.len += 1;
    }

    /// The job admission would take next.
    fn front(&self) -> Option<&Job> {
        self.tenants
            .front()
            .and_then(|(_, jobs)| jobs.front())
            .map(|(j, _)| j)
    }

    /// Takes the next job and moves its tenant to the back of the turn.
    fn pop(&mut self) -> Option<(Job, Instant)> {
        let (tenant, mut jobs) = self.tenants.pop_front()?;
        let job = jobs.pop_front();
        if !jobs.is_empty() {
            self.tenants.push_back((tenant, jobs));
        }
        self.len -= usize::from(job.is_some());
        job
    }

    /// Removes the jobs `expired` selects, handing each to `dropped`.
    fn retain(&mut self, mut expired: impl FnMut(&Job) -> bool, mut dropped: impl FnMut(Job)) {
        for (_, jobs) in self.tenants.iter_mut() {
            let mut kept = VecDeque::with_capacity(jobs.len());
            for (job, at) in jobs.drain(..) {
                if expired(&job) {
                    dropped(job);
                } else {
                    kept.push_back((job, at));
                }
            }
            *jobs = kept;
        }
        self.tenants.retain(|(_, jobs)| !jobs.is_empty());
        self.len = self.tenants.iter().map(|(_, j)| j.len()).sum();
    }

    fn labels(&self) -> Vec<String> {
        let jobs = self.tenants.iter().flat_map(|(_, j)| j.iter());
        distinct(jobs.map(|(j, _)| j.label.clone()))
    }
}

fn distinct(labels: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = labels.collect();
    v.sort();
    v.dedup();
    v
}

/// State shared by the engine thread and submitters.
struct Shared {
    // std Mutex: held for queue updates only, never across a forward pass.
    waiting: Mutex<Waiting>,
    wake: Condvar,
    stats: Mutex<EngineStats>,
    stop: AtomicBool,
    limits: EngineLimits,
    /// Positions the whole KV budget holds, to refuse jobs that can never fit.
    cache_positions: usize,
    context: usize,
}

impl Shared {
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine loop of one generation model.
pub struct Engine {
    model: Arc<TextModel>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the loop on its own thread.
    pub fn start(model: Arc<TextModel>, limits: EngineLimits) -> Self {
        let pool = model.model.kv_pool(limits.kv_cache_bytes);
        let shared = Arc::new(Shared {
            waiting: Mutex::new(Waiting::default()),
            wake: Condvar::new(),
            stats: Mutex::new(EngineStats {
                max_batch: limits.max_batch,
                ..Default::default()
            }),
            stop: AtomicBool::new(false),
            limits,
            cache_positions: pool.positions(),
            context: model.model.context_length(),
        });
        let looping = Loop {
            model: model.clone(),
            pool,
            running: Vec::new(),
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("knots-engine".into())
            .spawn(move || looping.run())
            .ok();
        Self {
            model,
            shared,
            thread,
        }
    }

    /// Queues a job. Fails at once, without queueing, when the queue is full, the engine has
    /// stopped, or the job can never fit in the KV cache; the job's sink is then dropped unused.
    pub fn submit(&self, job: Job) -> Result<()> {
        if self.shared.stop.load(Ordering::SeqCst) || self.thread.is_none() {
            return Err(EngineError::Stopped);
        }
        check_prompt(&job.prompt, self.shared.context)?;
        job.params.validate()?;
        let positions = reserved_positions(&job, self.shared.context);
        if positions > self.shared.cache_positions {
            return Err(EngineError::CacheTooSmall {
                positions,
                capacity: self.shared.cache_positions,
            });
        }
        let mut waiting = self.shared.waiting();
        if waiting.len >= self.shared.limits.max_queue {
            return Err(EngineError::QueueFull {
                limit: self.shared.limits.max_queue,
            });
        }
        waiting.push(job);
        drop(waiting);
        self.shared.wake.notify_one();
        Ok(())
    }

    pub fn stats(&self) -> EngineStats {
        let mut stats = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let waiting = self.shared.waiting();
        stats.waiting = waiting.len;
        stats.waiting_labels = waiting.labels();
        // Counted when read, off the step loop: a model loaded for any use packs its f32 panels
        // at its first products.
        stats.weight_bytes = Some(self.model.model.weight_bytes());
        stats
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Positions a job may fill: its prompt plus `max_tokens`, within the context.
fn reserved_positions(job: &Job, context: usize) -> usize {
    (job.prompt.len() + job.params.max_tokens).min(context)
}

/// A running sequence.
struct Running {
    job: Job,
    cache: SeqCache,
    decoder: Decoder,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The last sampled token, fed at the next step.
    next: Option<u32>,
    submitted: Instant,
    last_token: Option<Instant>,
}

impl Running {
    /// The tokens this sequence runs in a step given `budget` tokens left, if any.
    fn tokens(&self, budget: usize) -> Option<&[u32]> {
        match self.next.as_ref() {
            Some(id) => Some(std::slice::from_ref(id)),
            None if budget == 0 => None,
            None => {
                let end = (self.prefilled + budget).min(self.job.prompt.len());
                Some(&self.job.prompt[self.prefilled..end])
            }
        }
    }
}

/// What the engine thread owns.
struct Loop {
    model: Arc<TextModel>,
    pool: KvPool,
    running: Vec<Running>,
    shared: Arc<Shared>,
}

/// A sequence ends: how, and what to tell its sink.
enum Outcome {
    Done(FinishReason),
    Failed(EngineError),
    Gone,
}

impl Loop {
    fn run(mut self) {
        if let Err(error) = bind_to_thread(self.model.model.device()) {
            tracing::error!(%error, "engine thread");
        }
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.admit();
            if self.running.is_empty() {
                continue;
            }
            self.drop_expired_running();
            if self.running.is_empty() {
                continue;
            }
            let step = std::panic::catch_unwind(AssertUnwindSafe(|| self.step()));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("the forward pass panicked".to_string()),
            };
            if let Some(message) = failure {
                tracing::error!(%message, "engine step failed");
                for i in (0..self.running.len()).rev() {
                    let error = EngineError::Unsupported {
                        message: format!("engine step failed: {message}"),
                    };
                    self.finish(i, Outcome::Failed(error));
                }
            }
            self.publish();
        }
        for i in (0..self.running.len()).rev() {
            self.finish(i, Outcome::Failed(EngineError::Stopped));
        }
        let mut waiting = self.shared.waiting();
        while let Some((job, _)) = waiting.pop() {
            job.sink.failed(EngineError::Stopped);
        }
    }

    /// Moves waiting jobs into the batch while there is room; waits for work when idle.
    fn admit(&mut self) {
        let mut waiting = self.shared.waiting();
        let now = Instant::now();
        waiting.retain(
            |job| job.deadline <= now || job.sink.closed(),
            |job| {
                if job.sink.closed() {
                    drop(job);
                } else {
                    job.sink.failed(EngineError::Timeout);
                }
            },
        );
        while self.running.len() < self.shared.limits.max_batch {
            let Some(job) = waiting.front() else { break };
            let positions = reserved_positions(job, self.shared.context);
            let Some(cache) = self.pool.reserve(positions) else {
                break;
            };
            let Some((job, submitted)) = waiting.pop() else {
                self.pool.release(cache);
                break;
            };
            let decoder = Decoder::new(&job.params);
            self.running.push(Running {
                job,
                cache,
                decoder,
                prefilled: 0,
                next: None,
                submitted,
                last_token: None,
            });
        }
        if self.running.is_empty() && !self.shared.stop.load(Ordering::SeqCst) {
            let idle = self
                .shared
                .wake
                .wait_timeout(waiting, Duration::from_millis(100));
            drop(idle);
            self.publish();
        }
    }

    /// Ends sequences whose deadline passed or whose consumer went away.
    fn drop_expired_running(&mut self) {
        let now = Instant::now();
        for i in (0..self.running.len()).rev() {
            let job = &self.running[i].job;
            if job.sink.closed() {
                self.finish(i, Outcome::Gone);
            } else if job.deadline <= now {
                self.finish(i, Outcome::Failed(EngineError::Timeout));
            }
        }
    }

    /// One batched forward over every running sequence, then sampling.
    fn step(&mut self) -> Result<()> {
        let mut budget = self.shared.limits.step_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        // Decode tokens first, so arrivals never stall running sequences; prompts share the rest.
        let (decoding, prefilling): (Vec<usize>, Vec<usize>) =
            (0..self.running.len()).partition(|&i| self.running[i].next.is_some());
        for i in decoding.into_iter().chain(prefilling) {
            let Some(tokens) = self.running[i].tokens(budget) else {
                continue;
            };
            let n = tokens.len();
            budget = budget.saturating_sub(n);
            plan.push((i, n));
        }
        for &(i, n) in &plan {
            let r = &mut self.running[i];
            let needed = r.cache.len() + n;
            self.pool.grow(&mut r.cache, needed)?;
        }
        let logits = self.forward(&plan)?;
        telemetry::step_tokens(plan.iter().map(|(_, n)| n).sum());
        // Host logits are read where the step left them (a copy of a batch's rows is megabytes
        // per step); other devices' are copied to the host once.
        let vocab = logits.dim(1)?;
        let ended = match host::with_slice(&logits, |all| self.sample_rows(&plan, all, vocab)) {
            Some(ended) => ended?,
            None => {
                let all = logits.flatten_all()?.to_vec1::<f32>()?;
                self.sample_rows(&plan, &all, vocab)?
            }
        };
        for (i, outcome) in ended.into_iter().rev() {
            self.finish(i, outcome);
        }
        Ok(())
    }

    /// Samples the next token of every planned sequence that has one this step, from its row
    /// of `logits` (`vocab` values per row, one row per such sequence in plan order); returns
    /// the sequences that ended, in ascending order.
    fn sample_rows(
        &mut self,
        plan: &[(usize, usize)],
        logits: &[f32],
        vocab: usize,
    ) -> Result<Vec<(usize, Outcome)>> {
        let mut rows = logits.chunks_exact(vocab.max(1));
        let mut ended = Vec::new();
        for &(i, n) in plan {
            let r = &mut self.running[i];
            if r.next.is_none() {
                r.prefilled += n;
                if r.prefilled < r.job.prompt.len() {
                    continue;
                }
            }
            let scores = rows
                .next()
                .ok_or(EngineError::EmptyInput { what: "logits" })?;
            if let Some(outcome) = self.sample(i, scores)? {
                ended.push((i, outcome));
            }
        }
        ended.sort_by_key(|(i, _)| *i);
        Ok(ended)
    }

    /// Runs the planned `(sequence, tokens)` and returns one logits row per sequence that
    /// samples this step.
    fn forward(&mut self, plan: &[(usize, usize)]) -> Result<Tensor> {
        let mut picked: Vec<Option<&mut Running>> = self.running.iter_mut().map(Some).collect();
        let mut seqs = Vec::with_capacity(plan.len());
        for &(i, n) in plan {
            let Some(Running {
                job,
                cache,
                prefilled,
                next,
                ..
            }) = picked.get_mut(i).and_then(Option::take)
            else {
                continue;
            };
            let (tokens, logits) = match next.as_ref() {
                Some(id) => (std::slice::from_ref(id), true),
                None => {
                    let end = *prefilled + n;
                    (&job.prompt[*prefilled..end], end == job.prompt.len())
                }
            };
            seqs.push(StepSeq {
                cache,
                tokens,
                delta: job.delta.as_deref(),
                logits,
            });
        }
        self.model.model.step(&mut seqs)
    }

    /// Samples sequence `i`'s next token and streams its text; `Some` when it ends.
    fn sample(&mut self, i: usize, logits: &[f32]) -> Result<Option<Outcome>> {
        let context = self.shared.context;
        let r = &mut self.running[i];
        let room = r.cache.len() < context && r.cache.len() < r.cache.capacity();
        let step = r.decoder.accept(logits, &self.model.tokenizer, room)?;
        let now = Instant::now();
        match r.last_token {
            None => telemetry::first_token(now - r.submitted),
            Some(at) => telemetry::inter_token(now - at),
        }
        r.last_token = Some(now);
        let (id, finish) = (step.id, step.finish);
        let deliver = !step.fresh.is_empty() || step.logprob.is_some();
        if deliver && !r.job.sink.token(step.fresh, step.logprob) {
            return Ok(Some(Outcome::Gone));
        }
        r.next = Some(id);
        Ok(finish.map(Outcome::Done))
    }

    /// Removes sequence `i`, returns its cache blocks and tells its sink how it ended.
    fn finish(&mut self, i: usize, outcome: Outcome) {
        let mut r = self.running.swap_remove(i);
        let completion_tokens = r.decoder.completion_tokens(&self.model.tokenizer);
        let prompt_tokens = r.job.prompt.len();
        self.pool.release(r.cache);
        match outcome {
            Outcome::Done(finish) => {
                let rest = r.decoder.flush();
                if !rest.is_empty() {
                    r.job.sink.token(rest, None);
                }
                r.job.sink.done(Done {
                    prompt_tokens,
                    completion_tokens,
                    finish,
                });
            }
            Outcome::Failed(error) => r.job.sink.failed(error),
            Outcome::Gone => {}
        }
    }

    fn publish(&self) {
        let stats = EngineStats {
            waiting: 0,
            running: self.running.len(),
            kv_usage: self.pool.usage(),
            running_labels: distinct(self.running.iter().map(|r| r.job.label.clone())),
            waiting_labels: Vec::new(),
            max_batch: self.shared.limits.max_batch,
            weight_bytes: None,
        };
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Null;

    impl Sink for Null {
        fn token(&mut self, _: &str, _: Option<TokenLogprob>) -> bool {
            true
        }
        fn closed(&self) -> bool {
            false
        }
        fn done(self: Box<Self>, _: Done) {}
        fn failed(self: Box<Self>, _: EngineError) {}
    }

    fn job(tenant: &str, label: &str) -> Job {
        Job {
            tenant: tenant.into(),
            label: label.into(),
            prompt: vec![1],
            params: SamplingParams::default(),
            delta: None,
            deadline: Instant::now() + Duration::from_secs(60),
            sink: Box::new(Null),
        }
    }

    #[test]
    fn admission_takes_tenants_in_turn() {
        let mut w = Waiting::default();
        for i in 0..3 {
            w.push(job("burst", &format!("b{i}")));
        }
        w.push(job("quiet", "q0"));
        w.push(job("other", "o0"));
        let order: Vec<String> = std::iter::from_fn(|| w.pop().map(|(j, _)| j.label)).collect();
        assert_eq!(order, ["b0", "q0", "o0", "b1", "b2"]);
        assert_eq!(w.len, 0);
    }

    #[test]
    fn expired_jobs_leave_the_queue() {
        let mut w = Waiting::default();
        w.push(job("a", "keep"));
        let mut old = job("a", "old");
        old.deadline = Instant::now();
        w.push(old);
        w.push(job("b", "keep2"));
        let mut dropped = Vec::new();
        w.retain(|j| j.deadline <= Instant::now(), |j| dropped.push(j.label));
        assert_eq!(dropped, ["old"]);
        assert_eq!(w.len, 2);
        assert_eq!(w.labels(), ["keep", "keep2"]);
    }
}
