//! A/B experiments: named arms (each a `model` string) with traffic weights. A request for
//! `exp:<name>` gets an arm chosen by a hash of its `user` (sticky), or at random without one.
//! Per-arm statistics and feedback scores are kept in memory and exported as metrics.
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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::ModelSpec;
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

/// Running totals of one arm.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArmStats {
    pub requests: u64,
    pub errors: u64,
    pub total_seconds: f64,
    pub completion_tokens: u64,
    pub feedback_count: u64,
    pub feedback_sum: f64,
}

#[derive(Debug)]
pub struct Experiment {
    pub name: String,
    pub owner: Owner,
    pub arms: Vec<Arm>,
    stats: Mutex<BTreeMap<String, ArmStats>>,
}

/// How many request ids are remembered for feedback, per experiment.
const REMEMBERED_REQUESTS: usize = 100_000;

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
        let stats = arms
            .iter()
            .map(|a| (a.name.clone(), ArmStats::default()))
            .collect();
        let owner = c.tenant.map_or(Owner::Shared, Owner::Tenant);
        Ok(Self {
            name: c.name,
            owner,
            arms,
            stats: Mutex::new(stats),
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

    pub fn record(&self, arm: &str, ok: bool, seconds: f64, tokens: usize) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stats.get_mut(arm) {
            s.requests += 1;
            s.errors += u64::from(!ok);
            s.total_seconds += seconds;
            s.completion_tokens += tokens as u64;
        }
    }

    pub fn feedback(&self, arm: &str, score: f64) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stats.get_mut(arm) {
            s.feedback_count += 1;
            s.feedback_sum += score;
        }
    }

    pub fn stats(&self) -> BTreeMap<String, ArmStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Which experiment arm served a request, for which key, and whether it was scored.
#[derive(Debug, Clone)]
struct ServedBy {
    experiment: String,
    arm: String,
    key_id: Option<String>,
    scored: bool,
}

/// Why feedback for a request id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not served by this experiment (or forgotten), or served to another key: reported alike,
    /// so a key cannot probe other keys' request ids.
    Unknown,
    /// Already scored once.
    Scored,
}

/// Recent request ids and what served them, oldest ids first in `order`.
#[derive(Debug, Default)]
struct Served {
    by_id: HashMap<String, ServedBy>,
    order: VecDeque<String>,
}

/// All experiments, and which arm served each recent request (for feedback).
#[derive(Debug, Default)]
pub struct Experiments {
    pub list: Vec<Experiment>,
    // std Mutex: a map update per request, never held across an .await.
    served: Mutex<Served>,
}

impl Experiments {
    pub fn new(list: Vec<Experiment>) -> Self {
        Self {
            list,
            served: Mutex::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Experiment> {
        self.list.iter().find(|e| e.name == name)
    }

    /// Remembers that `request_id` was served by `arm` of `experiment` to the key `key_id`.
    pub fn remember(&self, request_id: &str, experiment: &str, arm: &str, key_id: Option<&str>) {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let Served { by_id: map, order } = &mut *served;
        map.insert(
            request_id.to_string(),
            ServedBy {
                experiment: experiment.to_string(),
                arm: arm.to_string(),
                key_id: key_id.map(str::to_string),
                scored: false,
            },
        );
        order.push_back(request_id.to_string());
        while order.len() > REMEMBERED_REQUESTS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// Takes the one score of `request_id` for the key `key_id`: the arm that served it, when
    /// `experiment` served it to that key and it was not scored yet.
    pub fn claim(
        &self,
        request_id: &str,
        experiment: &str,
        key_id: Option<&str>,
    ) -> Result<String, Refusal> {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let entry = served
            .by_id
            .get_mut(request_id)
            .filter(|s| s.experiment == experiment && s.key_id.as_deref() == key_id)
            .ok_or(Refusal::Unknown)?;
        if entry.scored {
            return Err(Refusal::Scored);
        }
        entry.scored = true;
        Ok(entry.arm.clone())
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
    fn feedback_is_claimed_once_by_the_key_that_was_served() {
        let all = Experiments::new(vec![experiment(&[1.0])]);
        all.remember("cmpl-1", "e", "arm0", Some("k1"));
        assert_eq!(all.claim("cmpl-1", "e", Some("k2")), Err(Refusal::Unknown));
        assert_eq!(
            all.claim("cmpl-1", "other", Some("k1")),
            Err(Refusal::Unknown)
        );
        assert_eq!(all.claim("cmpl-1", "e", Some("k1")), Ok("arm0".to_string()));
        assert_eq!(all.claim("cmpl-1", "e", Some("k1")), Err(Refusal::Scored));
        assert_eq!(all.claim("cmpl-2", "e", Some("k1")), Err(Refusal::Unknown));
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
