//! Which adapters running and waiting requests use, for `knots:lora_requests_info`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::metrics;

/// Counts of in-flight requests per adapter name.
#[derive(Debug)]
pub struct InFlight {
    // std Mutex: held for a map update only, never across an .await.
    running: Mutex<BTreeMap<String, usize>>,
    max_lora: usize,
}

/// Removes its adapters from the running set when dropped.
pub struct Running {
    owner: Arc<InFlight>,
    adapters: Vec<String>,
}

impl InFlight {
    pub fn new(max_lora: usize) -> Self {
        Self {
            running: Mutex::new(BTreeMap::new()),
            max_lora,
        }
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
        let names: Vec<String> = map.keys().cloned().collect();
        drop(map);
        metrics::lora_requests_info(&names, &[], self.max_lora);
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
