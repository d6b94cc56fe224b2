//! Which adapter sets requests outside the engines' queues use, for `knots_lora_requests_info`:
//! encoder requests while they run, and any request while its set is being resolved and merged
//! (reported as waiting, so an affinity router sends the set's next requests where its merge is
//! under way). Generation requests in an engine are reported by the engine.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a request is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Being resolved and merged, before it reaches an engine.
    Waiting,
    /// An encoder request being computed.
    Running,
}

/// Counts of in-flight requests per phase and adapter set.
#[derive(Debug, Default)]
pub struct InFlight {
    // std Mutex: held for a map update only, never across an .await.
    sets: Mutex<BTreeMap<(Phase, String), usize>>,
}

/// Removes its set from its phase when dropped.
pub struct Running {
    owner: Arc<InFlight>,
    key: Option<(Phase, String)>,
}

impl InFlight {
    /// The adapter sets in `phase`.
    pub fn sets(&self, phase: Phase) -> Vec<String> {
        let map = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        map.keys()
            .filter(|(p, _)| *p == phase)
            .map(|(_, set)| set.clone())
            .collect()
    }

    /// Marks `set` as in `phase` until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, phase: Phase, set: String) -> Running {
        let key = (phase, set);
        self.update(|map| *map.entry(key.clone()).or_default() += 1);
        Running {
            owner: self.clone(),
            key: Some(key),
        }
    }

    fn update(&self, f: impl FnOnce(&mut BTreeMap<(Phase, String), usize>)) {
        let mut map = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map);
        map.retain(|_, n| *n > 0);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.owner.update(|map| {
                if let Some(n) = map.get_mut(&key) {
                    *n -= 1;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_listed_per_phase_while_their_guards_live() {
        let inflight = Arc::new(InFlight::default());
        let a = inflight.start(Phase::Waiting, "a+b@ties".into());
        let b = inflight.start(Phase::Waiting, "a+b@ties".into());
        let c = inflight.start(Phase::Running, "enc-task".into());
        assert_eq!(inflight.sets(Phase::Waiting), ["a+b@ties"]);
        assert_eq!(inflight.sets(Phase::Running), ["enc-task"]);
        drop(a);
        assert_eq!(inflight.sets(Phase::Waiting), ["a+b@ties"]);
        drop((b, c));
        assert!(inflight.sets(Phase::Waiting).is_empty());
        assert!(inflight.sets(Phase::Running).is_empty());
    }
}
