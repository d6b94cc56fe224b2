//! Which adapter sets running encoder requests use, for `knots_lora_requests_info` (generation
//! requests are reported by their engine).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Counts of in-flight requests per adapter set.
#[derive(Debug, Default)]
pub struct InFlight {
    // std Mutex: held for a map update only, never across an .await.
    running: Mutex<BTreeMap<String, usize>>,
}

/// Removes its adapters from the running set when dropped.
pub struct Running {
    owner: Arc<InFlight>,
    adapters: Vec<String>,
}

impl InFlight {
    /// The adapter sets in flight.
    pub fn running(&self) -> Vec<String> {
        let map = self.running.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    /// Marks `adapters` as running until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, adapters: Vec<String>) -> Running {
        self.update(|map| {
            adapters
                .iter()
                .for_each(|a| *map.entry(a.clone()).or_default() += 1)
        });
        Running {
            owner: self.clone(),
            adapters,
        }
    }

    fn update(&self, f: impl FnOnce(&mut BTreeMap<String, usize>)) {
        let mut map = self.running.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map);
        map.retain(|_, n| *n > 0);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let adapters = std::mem::take(&mut self.adapters);
        self.owner.update(|map| {
            for a in &adapters {
                if let Some(n) = map.get_mut(a) {
                    *n -= 1;
                }
            }
        });
    }
}
