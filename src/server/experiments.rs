//! A/B experiments: named arms (each a `model` string, optionally with a `merge` field) with
//! traffic weights and a control arm. A request for `exp:<name>` gets an arm chosen by a hash of
//! its `user` (sticky), or at random without one.
//!
//! An experiment has a lifecycle: weights change (a ramp-up), arms or the whole experiment pause
//! (traffic goes to the control), and a stop records a winner (traffic goes to the winner, or the
//! control). Guardrails pause an arm automatically when its error rate or p95 latency exceeds a
//! bound against the control. Definitions, lifecycles and events live in the state store with
//! every request an arm served, so all of it survives restarts; experiments from the config file
//! load at start, keeping a lifecycle stored for them earlier.
//!
//! ```toml
//! [[experiments]]
//! name = "merge-vs-single"
//! tenant = "acme"            # optional
//! control = "billing"        # optional: the first arm
//! arms = [
//!   { name = "merged", model = "billing+returns", weight = 0.5 },
//!   { name = "billing", model = "billing", weight = 0.5 },
//! ]
//! guardrails = { max_error_rate_increase = 0.05, max_p95_latency_ratio = 2.0 }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ab_stats::quantile;
use super::spec::{MergeField, ModelSpec};
use super::store::{ArmSamples, Refusal, Store, StoreError, StoredExperiment};
use crate::adapters::{Owner, valid_name};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArmConfig {
    pub name: String,
    pub model: String,
    #[serde(default = "one")]
    pub weight: f64,
    /// Merge parameters of this arm's set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeField>,
}

fn one() -> f64 {
    1.0
}

/// Bounds that pause an arm against the control.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guardrails {
    /// Pause an arm whose error rate exceeds the control's by more than this (absolute).
    #[serde(default)]
    pub max_error_rate_increase: Option<f64>,
    /// Pause an arm whose p95 latency exceeds the control's times this.
    #[serde(default)]
    pub max_p95_latency_ratio: Option<f64>,
    /// Finished requests the arm and the control each need before a guardrail judges.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

fn default_min_requests() -> u64 {
    30
}

impl Default for Guardrails {
    fn default() -> Self {
        Self {
            max_error_rate_increase: None,
            max_p95_latency_ratio: None,
            min_requests: default_min_requests(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default)]
    pub tenant: Option<String>,
    pub arms: Vec<ArmConfig>,
    /// The arm the others are compared with; the first arm when not given.
    #[serde(default)]
    pub control: Option<String>,
    #[serde(default)]
    pub guardrails: Guardrails,
}

/// Where an experiment is in its life.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Status {
    Running,
    /// Every request goes to the control.
    Paused,
    /// Every request goes to the winner (the control when none was named); results stay readable.
    Stopped {
        winner: Option<String>,
    },
}

/// What changes over an experiment's life.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Lifecycle {
    pub weights: BTreeMap<String, f64>,
    /// Arms taken out of traffic (by hand or by a guardrail).
    pub paused_arms: BTreeSet<String>,
    pub status: Status,
}

#[derive(Debug, Clone)]
pub struct Arm {
    pub name: String,
    pub model: String,
    pub spec: ModelSpec,
    pub merge: MergeField,
}

#[derive(Debug)]
pub struct Experiment {
    pub name: String,
    pub owner: Owner,
    pub arms: Vec<Arm>,
    pub control: String,
    pub guardrails: Guardrails,
    pub config: ExperimentConfig,
    life: RwLock<Lifecycle>,
    /// Finished requests since start, to run the guardrails every few.
    finished: AtomicU64,
}

/// Run the guardrails once per this many finished requests of an experiment.
const GUARDRAIL_EVERY: u64 = 10;

impl Experiment {
    pub fn from_config(c: ExperimentConfig) -> Result<Self, String> {
        let bad = |what: String| Err(format!("experiment {}: {what}", c.name));
        if !valid_name(&c.name) || c.name.contains('/') {
            return Err(format!("experiment name {:?} is not valid", c.name));
        }
        if c.arms.is_empty() {
            return bad("has no arms".into());
        }
        let mut arms: Vec<Arm> = Vec::new();
        for a in &c.arms {
            let spec: ModelSpec = match a.model.parse() {
                Ok(spec) => spec,
                Err(e) => return bad(format!("arm {}: {e}", a.name)),
            };
            if matches!(spec, ModelSpec::Experiment(_)) {
                return bad(format!("arm {}: arms cannot be experiments", a.name));
            }
            if !valid_name(&a.name) || a.name.contains('/') {
                return bad(format!("arm name {:?} is not valid", a.name));
            }
            if !(a.weight.is_finite() && a.weight >= 0.0) {
                return bad(format!(
                    "arm {}: weight must be a finite number ≥ 0",
                    a.name
                ));
            }
            if arms.iter().any(|x| x.name == a.name) {
                return bad(format!("arm {} appears twice", a.name));
            }
            let merge = a.merge.clone().unwrap_or_default();
            if let Err(e) = merge.method() {
                return bad(format!("arm {}: {e}", a.name));
            }
            arms.push(Arm {
                name: a.name.clone(),
                model: a.model.clone(),
                spec,
                merge,
            });
        }
        if c.arms.iter().all(|a| a.weight == 0.0) {
            return bad("every weight is 0".into());
        }
        let control = c.control.clone().unwrap_or_else(|| arms[0].name.clone());
        if !arms.iter().any(|a| a.name == control) {
            return bad(format!("control {control:?} is not an arm"));
        }
        for (name, bound) in [
            (
                "max_error_rate_increase",
                c.guardrails.max_error_rate_increase,
            ),
            ("max_p95_latency_ratio", c.guardrails.max_p95_latency_ratio),
        ] {
            if bound.is_some_and(|b| !(b.is_finite() && b >= 0.0)) {
                return bad(format!("guardrail {name} must be a finite number ≥ 0"));
            }
        }
        let life = Lifecycle {
            weights: c.arms.iter().map(|a| (a.name.clone(), a.weight)).collect(),
            paused_arms: BTreeSet::new(),
            status: Status::Running,
        };
        Ok(Self {
            name: c.name.clone(),
            owner: c.tenant.clone().map_or(Owner::Shared, Owner::Tenant),
            arms,
            control,
            guardrails: c.guardrails.clone(),
            config: c,
            life: RwLock::new(life),
            finished: AtomicU64::new(0),
        })
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.life.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn arm(&self, name: &str) -> Option<&Arm> {
        self.arms.iter().find(|a| a.name == name)
    }

    /// The arm for `user`: the same user always gets the same arm while the weights stay; no
    /// user, a random one. Paused arms get no traffic; a paused experiment sends everyone to
    /// the control, a stopped one to its winner.
    pub fn pick(&self, user: Option<&str>) -> &Arm {
        let life = self.life.read().unwrap_or_else(|p| p.into_inner());
        let fixed = match &life.status {
            Status::Running => None,
            Status::Paused | Status::Stopped { winner: None } => Some(self.control.as_str()),
            Status::Stopped { winner: Some(w) } => Some(w.as_str()),
        };
        if let Some(name) = fixed {
            return self.arm(name).unwrap_or(&self.arms[0]);
        }
        let live: Vec<(&Arm, f64)> = self
            .arms
            .iter()
            .filter(|a| !life.paused_arms.contains(&a.name))
            .map(|a| (a, life.weights.get(&a.name).copied().unwrap_or(0.0)))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        let total: f64 = live.iter().map(|(_, w)| w).sum();
        if live.is_empty() {
            return self.arm(&self.control).unwrap_or(&self.arms[0]);
        }
        let u = match user {
            Some(user) => {
                let h = Sha256::digest(format!("{}\0{user}", self.name).as_bytes());
                let bits = u64::from_le_bytes(h[..8].try_into().unwrap_or([0; 8]));
                (bits >> 11) as f64 / (1u64 << 53) as f64
            }
            None => rand::random::<f64>(),
        };
        let mut acc = 0.0;
        for (arm, w) in &live {
            acc += w / total;
            if u < acc {
                return arm;
            }
        }
        live[live.len() - 1].0
    }

    /// The arm a guardrail would pause now, with the reason: an arm past a bound against the
    /// control, each with at least `min_requests` finished requests.
    fn breach(&self, samples: &BTreeMap<String, ArmSamples>) -> Option<(String, String)> {
        let g = &self.guardrails;
        let control = samples.get(&self.control)?;
        let enough = |s: &ArmSamples| s.requests >= g.min_requests.max(1);
        if !enough(control) {
            return None;
        }
        let error_rate = |s: &ArmSamples| s.errors as f64 / s.requests as f64;
        let life = self.lifecycle();
        for (arm, s) in samples {
            if arm == &self.control || life.paused_arms.contains(arm) || !enough(s) {
                continue;
            }
            if let Some(max) = g.max_error_rate_increase {
                let (a, c) = (error_rate(s), error_rate(control));
                if a - c > max {
                    return Some((
                        arm.clone(),
                        format!("error rate {a:.3} against the control's {c:.3} (bound +{max})"),
                    ));
                }
            }
            if let Some(max) = g.max_p95_latency_ratio {
                let (a, c) = (
                    quantile(&s.seconds, 0.95)?,
                    quantile(&control.seconds, 0.95)?,
                );
                if a > c * max {
                    return Some((
                        arm.clone(),
                        format!(
                            "p95 latency {a:.3} s against the control's {c:.3} s (bound ×{max})"
                        ),
                    ));
                }
            }
        }
        None
    }
}

/// Why a lifecycle change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("experiment {0:?} already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ChangeError {
    ChangeError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A change to an experiment's lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Weights(BTreeMap<String, f64>),
    Pause { arm: Option<String> },
    Resume { arm: Option<String> },
    Stop { winner: Option<String> },
}

/// All experiments, and the store of their definitions and the requests they served.
#[derive(Debug)]
pub struct Experiments {
    list: RwLock<Vec<Arc<Experiment>>>,
    store: Arc<Store>,
}

impl Experiments {
    /// The config file's experiments (with any lifecycle stored for them) and the ones created
    /// over the API.
    pub fn load(configured: Vec<Experiment>, store: Arc<Store>) -> Result<Self, StoreError> {
        let mut list: Vec<Arc<Experiment>> = Vec::new();
        let stored = store.experiments()?;
        for e in configured {
            let kept = stored.iter().find(|s| s.name == e.name);
            if let Some(life) =
                kept.and_then(|s| serde_json::from_str::<Lifecycle>(&s.lifecycle).ok())
                && life.weights.keys().eq(e.lifecycle().weights.keys())
            {
                *e.life.write().unwrap_or_else(|p| p.into_inner()) = life;
            }
            list.push(Arc::new(e));
        }
        for s in stored {
            if list.iter().any(|e| e.name == s.name) {
                continue;
            }
            let parsed = serde_json::from_str::<ExperimentConfig>(&s.config)
                .map_err(|e| e.to_string())
                .and_then(Experiment::from_config);
            match parsed {
                Ok(e) => {
                    if let Ok(life) = serde_json::from_str::<Lifecycle>(&s.lifecycle) {
                        *e.life.write().unwrap_or_else(|p| p.into_inner()) = life;
                    }
                    list.push(Arc::new(e));
                }
                Err(error) => {
                    tracing::warn!(experiment = %s.name, %error, "a stored experiment no longer loads; skipped")
                }
            }
        }
        Ok(Self {
            list: RwLock::new(list),
            store,
        })
    }

    /// Takes what another replica sharing the state database stored since: experiments it
    /// created, and the lifecycle (weights, paused arms, status) of each one. Returns how many
    /// experiments changed.
    pub fn refresh(&self) -> Result<usize, StoreError> {
        let stored = self.store.experiments()?;
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = 0;
        for s in stored {
            let life = serde_json::from_str::<Lifecycle>(&s.lifecycle).ok();
            if let Some(e) = list.iter().find(|e| e.name == s.name) {
                if let Some(life) = life
                    && life.weights.keys().eq(e.lifecycle().weights.keys())
                    && life != e.lifecycle()
                {
                    *e.life.write().unwrap_or_else(|p| p.into_inner()) = life;
                    changed += 1;
                }
                continue;
            }
            let parsed = serde_json::from_str::<ExperimentConfig>(&s.config)
                .map_err(|e| e.to_string())
                .and_then(Experiment::from_config);
            if let Ok(e) = parsed {
                if let Some(life) = life {
                    *e.life.write().unwrap_or_else(|p| p.into_inner()) = life;
                }
                list.push(Arc::new(e));
                changed += 1;
            }
        }
        Ok(changed)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Experiment>> {
        self.all().into_iter().find(|e| e.name == name)
    }

    pub fn all(&self) -> Vec<Arc<Experiment>> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn save(&self, e: &Experiment) -> Result<(), StoreError> {
        let json = |v: &dyn erased::Json| v.to_json();
        self.store.put_experiment(&StoredExperiment {
            name: e.name.clone(),
            config: json(&e.config),
            lifecycle: json(&e.lifecycle()),
        })
    }

    /// Creates an experiment, stored before it takes traffic.
    pub fn create(&self, config: ExperimentConfig) -> Result<Arc<Experiment>, ChangeError> {
        let e = Experiment::from_config(config).map_err(|r| invalid("experiment", r))?;
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|x| x.name == e.name) {
            return Err(ChangeError::Exists(e.name));
        }
        self.save(&e)?;
        self.store
            .event(&e.name, "created", &erased::Json::to_json(&e.config))?;
        let e = Arc::new(e);
        list.push(e.clone());
        Ok(e)
    }

    /// Applies `change` to `e`, stored (with an event) before it takes effect.
    pub fn change(&self, e: &Experiment, change: Change) -> Result<Lifecycle, ChangeError> {
        let mut life = e.lifecycle();
        let known = |arm: &str| {
            e.arm(arm)
                .map(|_| ())
                .ok_or_else(|| invalid("arm", format!("{arm:?} is not an arm of {}", e.name)))
        };
        let stopped = matches!(life.status, Status::Stopped { .. });
        let (kind, detail) = match &change {
            _ if stopped => {
                return Err(invalid("experiment", "a stopped experiment cannot change"));
            }
            Change::Weights(w) => {
                for (arm, weight) in w {
                    known(arm)?;
                    if !(weight.is_finite() && *weight >= 0.0) {
                        return Err(invalid(
                            "weights",
                            format!("{arm}: must be a finite number ≥ 0"),
                        ));
                    }
                    life.weights.insert(arm.clone(), *weight);
                }
                if life.weights.values().all(|w| *w == 0.0) {
                    return Err(invalid("weights", "every weight would be 0"));
                }
                ("weights", format!("{w:?}"))
            }
            Change::Pause { arm: Some(arm) } => {
                known(arm)?;
                if arm == &e.control {
                    return Err(invalid(
                        "arm",
                        "the control cannot be paused; pause the experiment",
                    ));
                }
                life.paused_arms.insert(arm.clone());
                ("arm paused", arm.clone())
            }
            Change::Resume { arm: Some(arm) } => {
                known(arm)?;
                life.paused_arms.remove(arm);
                ("arm resumed", arm.clone())
            }
            Change::Pause { arm: None } => {
                life.status = Status::Paused;
                ("paused", String::new())
            }
            Change::Resume { arm: None } => {
                life.status = Status::Running;
                ("resumed", String::new())
            }
            Change::Stop { winner } => {
                if let Some(w) = winner {
                    known(w)?;
                }
                life.status = Status::Stopped {
                    winner: winner.clone(),
                };
                ("stopped", winner.clone().unwrap_or_default())
            }
        };
        self.set(e, life.clone(), kind, &detail)?;
        Ok(life)
    }

    fn set(
        &self,
        e: &Experiment,
        life: Lifecycle,
        kind: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let mut current = e.life.write().unwrap_or_else(|p| p.into_inner());
        let previous = std::mem::replace(&mut *current, life);
        drop(current);
        let stored = self
            .save(e)
            .and_then(|()| self.store.event(&e.name, kind, detail));
        if stored.is_err() {
            // Not stored, not applied.
            *e.life.write().unwrap_or_else(|p| p.into_inner()) = previous;
        }
        stored
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

    /// Records how `request_id` ended, and every few requests runs the experiment's guardrails.
    pub fn finished(
        &self,
        experiment: &str,
        request_id: &str,
        ok: bool,
        seconds: f64,
        tokens: usize,
    ) -> Result<(), StoreError> {
        self.store.finished(request_id, ok, seconds, tokens)?;
        let Some(e) = self.get(experiment) else {
            return Ok(());
        };
        let guarded = e.guardrails.max_error_rate_increase.is_some()
            || e.guardrails.max_p95_latency_ratio.is_some();
        if guarded
            && e.finished.fetch_add(1, Ordering::Relaxed) % GUARDRAIL_EVERY == GUARDRAIL_EVERY - 1
        {
            self.guard(&e)?;
        }
        Ok(())
    }

    /// Pauses an arm past a guardrail, recording why.
    pub fn guard(&self, e: &Experiment) -> Result<Option<String>, StoreError> {
        let samples = self.store.arm_samples(&e.name)?;
        let Some((arm, reason)) = e.breach(&samples) else {
            return Ok(None);
        };
        let mut life = e.lifecycle();
        life.paused_arms.insert(arm.clone());
        tracing::warn!(experiment = %e.name, %arm, %reason, "guardrail paused an arm");
        self.set(e, life, "guardrail paused arm", &format!("{arm}: {reason}"))?;
        Ok(Some(arm))
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

    pub fn samples(&self, experiment: &str) -> Result<BTreeMap<String, ArmSamples>, StoreError> {
        self.store.arm_samples(experiment)
    }

    pub fn feedback_mean(&self, experiment: &str, arm: &str) -> Result<Option<f64>, StoreError> {
        self.store.feedback_mean(experiment, arm)
    }

    pub fn events(&self, experiment: &str) -> Result<Vec<super::store::Event>, StoreError> {
        self.store.events(experiment)
    }
}

/// JSON of the stored parts (they serialize infallibly: plain data).
mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(weights: &[f64]) -> ExperimentConfig {
        let arms = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| ArmConfig {
                name: format!("arm{i}"),
                model: format!("a{i}"),
                weight,
                merge: None,
            })
            .collect();
        ExperimentConfig {
            name: "e".into(),
            tenant: None,
            arms,
            control: None,
            guardrails: Guardrails::default(),
        }
    }

    fn experiments() -> Experiments {
        Experiments::load(Vec::new(), Arc::new(Store::in_memory().unwrap())).unwrap()
    }

    #[test]
    fn assignment_is_sticky_per_user_and_follows_the_weights() {
        let e = Experiment::from_config(config(&[3.0, 1.0])).unwrap();
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
    fn the_lifecycle_routes_traffic() {
        let all = experiments();
        let e = all.create(config(&[1.0, 1.0])).unwrap();
        let arms = |e: &Experiment| -> BTreeSet<String> {
            (0..200)
                .map(|i| e.pick(Some(&format!("u{i}"))).name.clone())
                .collect()
        };
        assert_eq!(arms(&e).len(), 2);
        all.change(&e, Change::Weights([("arm1".to_string(), 0.0)].into()))
            .unwrap();
        assert_eq!(arms(&e), ["arm0".to_string()].into());
        all.change(&e, Change::Weights([("arm1".to_string(), 1.0)].into()))
            .unwrap();
        all.change(
            &e,
            Change::Pause {
                arm: Some("arm1".into()),
            },
        )
        .unwrap();
        assert_eq!(arms(&e), ["arm0".to_string()].into());
        all.change(
            &e,
            Change::Resume {
                arm: Some("arm1".into()),
            },
        )
        .unwrap();
        all.change(&e, Change::Pause { arm: None }).unwrap();
        assert_eq!(arms(&e), ["arm0".to_string()].into(), "paused: the control");
        all.change(&e, Change::Resume { arm: None }).unwrap();
        all.change(
            &e,
            Change::Stop {
                winner: Some("arm1".into()),
            },
        )
        .unwrap();
        assert_eq!(arms(&e), ["arm1".to_string()].into(), "stopped: the winner");
        assert!(all.change(&e, Change::Resume { arm: None }).is_err());
        assert!(all.create(config(&[1.0])).is_err(), "the name is taken");
        let kinds: Vec<String> = all
            .events("e")
            .unwrap()
            .into_iter()
            .map(|ev| ev.kind)
            .collect();
        assert_eq!(kinds.first().map(String::as_str), Some("created"));
        assert_eq!(kinds.last().map(String::as_str), Some("stopped"));
    }

    #[test]
    fn bad_changes_are_refused() {
        let all = experiments();
        let e = all.create(config(&[1.0, 1.0])).unwrap();
        for change in [
            Change::Weights([("nope".to_string(), 1.0)].into()),
            Change::Weights([("arm0".to_string(), -1.0)].into()),
            Change::Weights([("arm0".to_string(), 0.0), ("arm1".to_string(), 0.0)].into()),
            Change::Pause {
                arm: Some("arm0".into()),
            },
            Change::Stop {
                winner: Some("nope".into()),
            },
        ] {
            assert!(
                matches!(
                    all.change(&e, change.clone()),
                    Err(ChangeError::Invalid { .. })
                ),
                "{change:?}"
            );
        }
        assert_eq!(e.lifecycle().weights["arm0"], 1.0, "nothing applied");
    }

    #[test]
    fn a_guardrail_pauses_an_arm_with_too_many_errors() {
        let store = Arc::new(Store::in_memory().unwrap());
        let all = Experiments::load(Vec::new(), store.clone()).unwrap();
        let mut c = config(&[1.0, 1.0]);
        c.guardrails = Guardrails {
            max_error_rate_increase: Some(0.1),
            max_p95_latency_ratio: None,
            min_requests: 20,
        };
        let e = all.create(c).unwrap();
        for i in 0..40 {
            let (arm, ok) = if i % 2 == 0 {
                ("arm0", true)
            } else {
                ("arm1", i % 3 != 0)
            };
            let id = format!("r{i}");
            all.remember(&id, "e", arm, None).unwrap();
            all.finished("e", &id, ok, 0.1, 1).unwrap();
        }
        assert!(
            e.lifecycle().paused_arms.contains("arm1"),
            "{:?}",
            e.lifecycle()
        );
        let events = all.events("e").unwrap();
        assert!(
            events
                .iter()
                .any(|ev| ev.kind == "guardrail paused arm" && ev.detail.starts_with("arm1"))
        );
    }

    #[test]
    fn stored_lifecycles_come_back() {
        let store = Arc::new(Store::in_memory().unwrap());
        let all = Experiments::load(Vec::new(), store.clone()).unwrap();
        let e = all.create(config(&[1.0, 1.0])).unwrap();
        all.change(&e, Change::Weights([("arm0".to_string(), 9.0)].into()))
            .unwrap();
        let again = Experiments::load(Vec::new(), store.clone()).unwrap();
        assert_eq!(again.get("e").unwrap().lifecycle().weights["arm0"], 9.0);
        // A config-file experiment of the same name keeps the stored lifecycle.
        let configured = Experiment::from_config(config(&[1.0, 1.0])).unwrap();
        let again = Experiments::load(vec![configured], store).unwrap();
        assert_eq!(again.get("e").unwrap().lifecycle().weights["arm0"], 9.0);
    }

    #[test]
    fn bad_configs_are_rejected() {
        assert!(Experiment::from_config(config(&[])).is_err());
        assert!(Experiment::from_config(config(&[0.0, 0.0])).is_err());
        let mut nested = config(&[1.0]);
        nested.arms[0].model = "exp:e".into();
        assert!(Experiment::from_config(nested).is_err());
        let mut control = config(&[1.0]);
        control.control = Some("nope".into());
        assert!(Experiment::from_config(control).is_err());
    }
}
