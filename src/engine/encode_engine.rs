//! The serving engine of one encoder model: a loop on its own thread that batches concurrent
//! embeddings and classification requests, whatever their adapter sets, into shared forwards.
//!
//! Each turn takes every waiting job (up to a bound) and cuts their texts, in order, into batches
//! of at most [`BATCH_TOKENS`] tokens; each batch is one BERT forward over the texts laid end to
//! end (no padding: attention stays within each text's rows), whose rows carry their own
//! request's delta (see `linear::Deltas`). Results go back to each job as
//! [`Features`]. A job whose deadline passes is answered with a timeout and its remaining texts
//! are not run, whether it was still waiting or part of a turn (checked before every batch).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::bert::{cls_rows, mean_pool_packed};
use super::device::bind_to_thread;
use super::error::{EngineError, Result};
use super::heads::Features;
use super::linear::{Deltas, LoadedDelta, row_groups};
use super::models::Encoder;

/// Tokens one forward holds at most (texts laid end to end, no padding); a longer text runs
/// alone.
const BATCH_TOKENS: usize = 4096;
/// Texts one turn takes from the queue at most (whole jobs; at least one job).
const TURN_TEXTS: usize = 256;

/// An encoding request for the engine.
pub struct EncodeJob {
    /// Token ids of each text (`Encoder::encode`).
    pub ids: Vec<Vec<u32>>,
    pub delta: Option<Arc<LoadedDelta>>,
    /// Whether to compute the pooler output too (trained classifier heads read it).
    pub pooled: bool,
    pub deadline: Instant,
}

type Reply = SyncSender<Result<Features>>;

struct Shared {
    // std Mutex: held for queue updates only, never across a forward pass.
    queue: Mutex<VecDeque<(EncodeJob, Reply)>>,
    wake: Condvar,
    stop: AtomicBool,
    max_queue: usize,
}

/// The engine loop of one encoder model.
pub struct EncoderEngine {
    encoder: Arc<Encoder>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EncoderEngine {
    pub fn start(encoder: Arc<Encoder>, max_queue: usize) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            max_queue,
        });
        let (looping, loop_shared) = (encoder.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("knots-encoder".into())
            .spawn(move || run(&looping, &loop_shared))
            .ok();
        Self {
            encoder,
            shared,
            thread,
        }
    }

    /// Queues a job; its result arrives on the returned channel.
    pub fn submit(&self, job: EncodeJob) -> Result<Receiver<Result<Features>>> {
        if job.ids.is_empty() {
            return Err(EngineError::EmptyInput { what: "texts" });
        }
        if self.shared.stop.load(Ordering::SeqCst) || self.thread.is_none() {
            return Err(EngineError::Stopped);
        }
        let (tx, rx) = sync_channel(1);
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= self.shared.max_queue {
            return Err(EngineError::QueueFull {
                limit: self.shared.max_queue,
            });
        }
        queue.push_back((job, tx));
        drop(queue);
        self.shared.wake.notify_one();
        Ok(rx)
    }

    /// Bytes the encoder's weights hold in memory now ([`crate::engine::Bert::weight_bytes`]).
    pub fn weight_bytes(&self) -> usize {
        self.encoder.model.weight_bytes()
    }

    /// Jobs waiting for their turn.
    pub fn waiting(&self) -> usize {
        self.shared
            .queue
            .lock()
            .map(|q| q.len())
            .unwrap_or_default()
    }
}

impl Drop for EncoderEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(encoder: &Encoder, shared: &Shared) {
    if let Err(error) = bind_to_thread(encoder.model.device()) {
        tracing::error!(%error, "encoder thread");
    }
    while !shared.stop.load(Ordering::SeqCst) {
        let jobs = next_turn(shared);
        if jobs.is_empty() {
            continue;
        }
        let now = Instant::now();
        let (live, expired): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|(job, _)| job.deadline > now);
        for (_, reply) in expired {
            let _ = reply.send(Err(EngineError::Timeout));
        }
        let results =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| encode_all(encoder, &live)))
                .unwrap_or_else(|_| {
                    Err(EngineError::Unsupported {
                        message: "the encoder forward panicked".into(),
                    })
                });
        match results {
            Ok(features) => {
                for ((_, reply), f) in live.iter().zip(features) {
                    let _ = reply.send(f);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (_, reply) in &live {
                    let _ = reply.send(Err(EngineError::Unsupported {
                        message: message.clone(),
                    }));
                }
            }
        }
    }
    let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
    for (_, reply) in queue.drain(..) {
        let _ = reply.send(Err(EngineError::Stopped));
    }
}

/// Waits for work, then takes whole jobs up to [`TURN_TEXTS`] texts.
fn next_turn(shared: &Shared) -> Vec<(EncodeJob, Reply)> {
    let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
    if queue.is_empty() {
        queue = match shared.wake.wait_timeout(queue, Duration::from_millis(100)) {
            Ok((q, _)) => q,
            Err(p) => p.into_inner().0,
        };
    }
    let mut taken = Vec::new();
    let mut texts = 0;
    while let Some((job, _)) = queue.front() {
        if !taken.is_empty() && texts + job.ids.len() > TURN_TEXTS {
            break;
        }
        texts += job.ids.len();
        taken.extend(queue.pop_front());
    }
    taken
}

/// One text of a turn: its job, its index in the job, its length.
#[derive(Clone, Copy)]
struct Item {
    job: usize,
    text: usize,
    len: usize,
}

/// Encodes every text of `jobs` in batches of [`BATCH_TOKENS`]; one [`Features`] per job, or a timeout
/// for a job whose deadline passed before all its texts ran (its remaining texts are skipped).
fn encode_all(encoder: &Encoder, jobs: &[(EncodeJob, Reply)]) -> Result<Vec<Result<Features>>> {
    let items: Vec<Item> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, (job, _))| {
            job.ids.iter().enumerate().map(move |(t, ids)| Item {
                job: j,
                text: t,
                len: ids.len(),
            })
        })
        .collect();
    let mut mean: Vec<Vec<Option<Tensor>>> =
        jobs.iter().map(|(j, _)| vec![None; j.ids.len()]).collect();
    let mut pooled = mean.clone();
    let mut expired = vec![false; jobs.len()];
    for batch in batches(&items) {
        let now = Instant::now();
        for (j, (job, _)) in jobs.iter().enumerate() {
            expired[j] |= job.deadline <= now;
        }
        let batch: Vec<Item> = batch.iter().filter(|i| !expired[i.job]).copied().collect();
        if batch.is_empty() {
            continue;
        }
        let (m, p) = encode_batch(encoder, jobs, &batch)?;
        for (k, item) in batch.iter().enumerate() {
            mean[item.job][item.text] = Some(m.get(k)?);
            if let Some(p) = &p {
                pooled[item.job][item.text] = Some(p.get(k)?);
            }
        }
    }
    Ok(jobs
        .iter()
        .zip(expired)
        .zip(mean.into_iter().zip(pooled))
        .map(|(((job, _), expired), (m, p))| {
            if expired {
                return Err(EngineError::Timeout);
            }
            Ok(Features {
                mean: stack(m)?,
                pooled: if job.pooled { Some(stack(p)?) } else { None },
            })
        })
        .collect())
}

/// Consecutive runs of items of at most [`BATCH_TOKENS`] tokens (a longer item alone).
fn batches(items: &[Item]) -> Vec<&[Item]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let mut end = start + 1;
        let mut tokens = items[start].len;
        while end < items.len() && tokens + items[end].len <= BATCH_TOKENS {
            tokens += items[end].len;
            end += 1;
        }
        out.push(&items[start..end]);
        start = end;
    }
    out
}

/// One forward over `batch` laid end to end, each text with its job's delta: mean-pooled
/// embeddings and, when a job asks, pooler outputs (rows in batch order).
fn encode_batch(
    encoder: &Encoder,
    jobs: &[(EncodeJob, Reply)],
    batch: &[Item],
) -> Result<(Tensor, Option<Tensor>)> {
    let seqs: Vec<Vec<u32>> = batch
        .iter()
        .map(|i| jobs[i.job].0.ids[i.text].clone())
        .collect();
    let packed = encoder.model.pack(&seqs)?;
    let delta_of = |i: &Item| jobs[i.job].0.delta.as_deref();
    let device = encoder.model.device();
    let token_groups = row_groups(
        batch
            .iter()
            .enumerate()
            .map(|(k, i)| (delta_of(i), packed.rows(k))),
        packed.tokens(),
        device,
    )?;
    let hidden = encoder
        .model
        .hidden_packed(&packed, Deltas::Grouped(&token_groups))?;
    let mean = mean_pool_packed(&hidden, &packed)?;
    let pooled = if batch.iter().any(|i| jobs[i.job].0.pooled) {
        let cls_groups = row_groups(
            batch
                .iter()
                .enumerate()
                .map(|(k, i)| (delta_of(i), k..k + 1)),
            batch.len(),
            device,
        )?;
        let cls = cls_rows(&hidden, &packed)?;
        Some(
            encoder
                .model
                .pool_rows(&cls, Deltas::Grouped(&cls_groups))?,
        )
    } else {
        None
    };
    Ok((mean, pooled))
}

fn stack(rows: Vec<Option<Tensor>>) -> Result<Tensor> {
    let rows: Vec<Tensor> = rows
        .into_iter()
        .map(|r| {
            r.ok_or(EngineError::EmptyInput {
                what: "encoded text",
            })
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(lens: &[usize]) -> Vec<Item> {
        lens.iter()
            .enumerate()
            .map(|(t, &len)| Item {
                job: 0,
                text: t,
                len,
            })
            .collect()
    }

    fn sizes(lens: &[usize]) -> Vec<usize> {
        batches(&items(lens)).iter().map(|b| b.len()).collect()
    }

    #[test]
    fn texts_fill_batches_up_to_the_token_bound_in_order() {
        // 300 texts of 20 tokens: 204 fit in 4096 tokens.
        assert_eq!(sizes(&[20; 300]), vec![204, 96]);
        let all = items(&[20; 300]);
        let order: Vec<usize> = batches(&all).concat().iter().map(|i| i.text).collect();
        assert_eq!(order, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn a_text_longer_than_the_bound_runs_alone() {
        assert_eq!(sizes(&[10, 5000, 10, 4090, 6]), vec![1, 1, 1, 2]);
        for b in batches(&items(&[3000, 3000, 3000, 10])) {
            let tokens: usize = b.iter().map(|i| i.len).sum();
            assert!(b.len() == 1 || tokens <= BATCH_TOKENS);
        }
    }
}
