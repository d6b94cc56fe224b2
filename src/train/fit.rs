//! The optimisation loop shared by every kind of adapter: seeded batches, AdamW on the LoRA
//! factors, a loss per step, then the validation accuracy of the exported update.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::Optimizer;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use super::lora::LoraFactors;
use super::record::{StepReport, TrainConfig, TrainRecord};
use crate::engine::{LinearRegistry, LoadedDelta};

/// What one training run needs besides its loss.
pub(super) struct Run<'a> {
    pub task: &'a str,
    pub kind: &'static str,
    pub base_model: &'a str,
    pub train_examples: usize,
    pub val_examples: usize,
    pub cfg: &'a TrainConfig,
    pub registry: &'a LinearRegistry,
    pub device: &'a candle_core::Device,
}

impl Run<'_> {
    /// Trains fresh factors: `loss(delta, batch)` is the mean loss of the training examples
    /// `batch` under the trainable `delta`; `accuracy(delta)` scores the validation split
    /// (`None` for the base model).
    pub fn fit(
        &self,
        mut loss: impl FnMut(&LoadedDelta, &[usize]) -> Result<Tensor, TrainError>,
        mut accuracy: impl FnMut(Option<&LoadedDelta>) -> Result<f64, TrainError>,
        on_step: &mut dyn FnMut(StepReport),
    ) -> Result<(LoraFactors, TrainRecord), TrainError> {
        let cfg = self.cfg;
        cfg.validate()?;
        if self.train_examples == 0 {
            return Err(TrainError::Invalid(format!(
                "task {}: no training examples",
                self.task
            )));
        }
        let started = Instant::now();
        let base_val_accuracy = accuracy(None)?;
        let factors = LoraFactors::new(
            self.registry,
            &cfg.targets,
            cfg.rank,
            cfg.alpha,
            cfg.seed,
            self.device,
        )?;
        let params = candle_nn::ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        };
        let vars = factors.vars();
        let mut optimizer = candle_nn::AdamW::new(vars.clone(), params)?;
        let steps = cfg.steps(self.train_examples);
        let mut loss_curve = Vec::with_capacity(steps);
        for (step, batch) in batches(self.train_examples, cfg, steps)
            .into_iter()
            .enumerate()
        {
            let delta = factors.trainable(self.registry)?;
            let (value, grads) =
                batch_gradients(&vars, &delta, &batch, cfg.micro_batch_size, &mut loss)?;
            optimizer.step(&grads)?;
            loss_curve.push(value);
            on_step(StepReport {
                step: step + 1,
                steps,
                loss: value,
            });
        }
        let trained = self.registry.convert(&factors.to_delta()?, self.device)?;
        let val_accuracy = accuracy(Some(&trained))?;
        let record = TrainRecord {
            knots_version: env!("CARGO_PKG_VERSION"),
            task: self.task.to_string(),
            kind: self.kind,
            base_model: self.base_model.to_string(),
            train_examples: self.train_examples,
            val_examples: self.val_examples,
            steps,
            config: cfg.clone(),
            loss_curve,
            val_accuracy,
            base_val_accuracy,
            wall_seconds: started.elapsed().as_secs_f64(),
        };
        Ok((factors, record))
    }
}

/// The mean loss over `batch` and its gradients for `vars`, summed over micro-batches of
/// `micro` examples (each weighted by its share of the batch), so the result equals one
/// backward pass over the whole batch while only one micro-batch's graph is alive at a time.
pub fn batch_gradients(
    vars: &[Var],
    delta: &LoadedDelta,
    batch: &[usize],
    micro: usize,
    loss: &mut impl FnMut(&LoadedDelta, &[usize]) -> Result<Tensor, TrainError>,
) -> Result<(f32, GradStore), TrainError> {
    let mut total = GradStore::default();
    let mut mean = 0f32;
    for chunk in batch.chunks(micro.max(1)) {
        let share = chunk.len() as f64 / batch.len() as f64;
        let value = (loss(delta, chunk)? * share)?;
        mean += value.to_scalar::<f32>()?;
        let mut grads = value.backward()?;
        for var in vars {
            let Some(grad) = grads.remove(var.as_tensor()) else {
                continue;
            };
            let sum = match total.remove(var.as_tensor()) {
                Some(acc) => (acc + grad)?,
                None => grad,
            };
            total.insert(var.as_tensor(), sum);
        }
    }
    Ok((mean, total))
}

/// Example indices of each step: seeded shuffles of the training split, one per epoch.
fn batches(examples: usize, cfg: &TrainConfig, steps: usize) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1));
    let mut out = Vec::with_capacity(steps);
    while out.len() < steps {
        let mut order: Vec<usize> = (0..examples).collect();
        order.shuffle(&mut rng);
        out.extend(order.chunks(cfg.batch_size).map(<[usize]>::to_vec));
    }
    out.truncate(steps);
    out
}
