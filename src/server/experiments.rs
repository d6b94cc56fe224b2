//! A/B experiments: named arms (each a `model` string) with traffic weights. A request for
//! `exp:<name>` gets an arm chosen by a hash of its `user` (sticky), or at random without one.
//! Every request an arm serves, how it ended and its feedback score are kept in the state store
//! (so they survive restarts); per-arm statistics are computed from them and also exported as
//! metrics.
//!
//! ```toml
//! [[experiments]]
//! name = "merge-vs-single"
//! tenant = "acme"            # optional
//! arms = [
//!   { name = "merged", model = "billing+returns", weight = 0.5 },
//!   { name = "billing", model = "billing", weight = 0.5 },
//! ]
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::spec::ModelSpec;
use super::store::{ArmTotals, Refusal, Store, StoreError};
use crate::adapters::{Owner, valid_name};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    pub name: String,
    pub model: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default)]
    pub tenant: Option<String>,
    pub arms: Vec<ArmConfig>,
}

#[derive(Debug, Clone)]
pub struct Arm {
    pub name: String,
    pub model: String,
    pub spec: ModelSpec,
    pub weight: f64,
}

#[derive(Debug)]
pub struct Experiment {
    pub name: String,
    pub owner: Owner,
    pub arms: Vec<Arm>,
}

impl Experiment {
    pub fn from_config(c: ExperimentConfig) -> Result<Self, String> {
        if !valid_name(&c.name) || c.name.contains('/') {
            return Err(format!("experiment name {:?} is not valid", c.name));
        }
        if c.arms.is_empty() {
            return Err(format!("experiment {} has no arms", c.name));
        }
        let mut arms = Vec::new();
        for a in c.arms {
            let spec: ModelSpec = a
                .model
                .parse()
                .map_err(|e| format!("experiment {} arm {}: {e}", c.name, a.name))?;
            if matches!(spec, ModelSpec::Experiment(_)) {
                return Err(format!(
                    "experiment {} arm {}: arms cannot be experiments",
                    c.name, a.name
                ));
            }
            if !(a.weight.is_finite() && a.weight > 0.0) {
                return Err(format!(
                    "experiment {} arm {}: weight must be positive",
                    c.name, a.name
                ));
            }
            if arms.iter().any(|x: &Arm| x.name == a.name) {
                return Err(format!(
                    "experiment {}: arm {} appears twice",
                    c.name, a.name
                ));
            }
            arms.push(Arm {
                name: a.name,
                model: a.model,
                spec,
                weight: a.weight,
            });
        }
        let owner = c.tenant.map_or(Owner::Shared, Owner::Tenant);
        Ok(Self {
            name: c.name,
            owner,
            arms,
        })
    }

    /// The arm for `user`: the same user always gets the same arm; no user, a random one.
    pub fn pick(&self, user: Option<&str>) -> &Arm {
        let u = match user {
            Some(user) => {
                let h = Sha256::digest(format!("{}\0{user}", self.name).as_bytes());
                let bits = u64::from_le_bytes(h[..8].try_into().unwrap_or([0; 8]));
                (bits >> 11) as f64 / (1u64 << 53) as f64
            }
            None => rand::random::<f64>(),
        };
        let total: f64 = self.arms.iter().map(|a| a.weight).sum();
        let mut acc = 0.0;
        for arm in &self.arms {
            acc += arm.weight / total;
            if u < acc {
                return arm;
            }
        }
        &self.arms[self.arms.len() - 1]
    }
}

/// All experiments, and the store of the requests they served.
#[derive(Debug)]
pub struct Experiments {
    pub list: Vec<Experiment>,
    store: Arc<Store>,
}

impl Experiments {
    pub fn new(list: Vec<Experiment>, store: Arc<Store>) -> Self {
        Self { list, store }
    }

    pub fn get(&self, name: &str) -> Option<&Experiment> {
        self.list.iter().find(|e| e.name == name)
    }

    /// Records, before the response goes out, that `arm` of `experiment` serves `request_id`
    /// to the key `key_id`.
    pub fn remember(
        &self,
        request_id: &str,
        experiment: &str,
        arm: &str,
        key_id: Option<&str>,
    ) -> Result<(), StoreError> {
        self.store.served(request_id, experiment, arm, key_id)
    }

    /// Records how `request_id` ended.
    pub fn finished(
        &self,
        request_id: &str,
        ok: bool,
        seconds: f64,
        tokens: usize,
    ) -> Result<(), StoreError> {
        self.store.finished(request_id, ok, seconds, tokens)
    }

    /// Stores the one score of `request_id` for the key `key_id`: the arm that served it, when
    /// `experiment` served it to that key and it was not scored yet.
    pub fn feedback(
        &self,
        request_id: &str,
        experiment: &str,
        key_id: Option<&str>,
        score: f64,
    ) -> Result<Result<String, Refusal>, StoreError> {
        self.store.feedback(request_id, experiment, key_id, score)
    }

    /// Per-arm totals of `experiment`.
    pub fn totals(&self, experiment: &str) -> Result<BTreeMap<String, ArmTotals>, StoreError> {
        self.store.arm_totals(experiment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experiment(weights: &[f64]) -> Experiment {
        let arms = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| ArmConfig {
                name: format!("arm{i}"),
                model: format!("a{i}"),
                weight,
            })
            .collect();
        Experiment::from_config(ExperimentConfig {
            name: "e".into(),
            tenant: None,
            arms,
        })
        .unwrap()
    }

    #[test]
    fn assignment_is_sticky_per_user_and_follows_the_weights() {
        let e = experiment(&[3.0, 1.0]);
        assert_eq!(e.pick(Some("alice")).name, e.pick(Some("alice")).name);
        let first = (0..4000)
            .filter(|i| e.pick(Some(&format!("user{i}"))).name == "arm0")
            .count();
        assert!(
            (2800..3200).contains(&first),
            "arm0 got {first} of 4000 at weight 3:1"
        );
    }

    #[test]
    fn bad_configs_are_rejected() {
        let bad = ExperimentConfig {
            name: "e".into(),
            tenant: None,
            arms: vec![],
        };
        assert!(Experiment::from_config(bad).is_err());
        let arm = ArmConfig {
            name: "x".into(),
            model: "exp:e".into(),
            weight: 1.0,
        };
        let nested = ExperimentConfig {
            name: "e".into(),
            tenant: None,
            arms: vec![arm],
        };
        assert!(Experiment::from_config(nested).is_err());
    }
}
