//! PEFT LoRA adapters: the on-disk format (read and write), validation, and content digests.
//!
//! Step in the data flow: an adapter name resolves to an `Arc<LoraAdapter>` whose factors feed
//! the merge; its digest enters the merge cache key so a changed adapter never hits a stale merge.

mod config;
mod error;
mod fetch;
mod read;
mod registry;
mod write;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use config::{AdapterConfig, TargetModules, UNSUPPORTED_OPTIONS};
pub use error::AdapterError;
pub use fetch::{AdapterCache, AdapterUri};
pub use read::{CONFIG_FILE, PEFT_PREFIX, TASK_FILE, WEIGHTS_FILE};
pub use registry::{Owner, Registered, Registry, owner_of, valid_name};
pub use write::{DELTA_FILE, ExportInfo, RECORD_FILE, write_delta, write_peft};

use crate::matrix::Matrix;
use crate::merge::{MergedDelta, ModuleDelta};

/// The LoRA factors of one target module: `ΔW = scale · b · a`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// `lora_A`, `r × I`.
    pub a: Matrix,
    /// `lora_B`, `O × r`.
    pub b: Matrix,
    /// `lora_alpha / r` (rsLoRA: `lora_alpha / √r`), with per-module patterns applied.
    pub scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.rows()
    }

    /// `(O, I)` of the weight this module updates.
    pub fn shape(&self) -> (usize, usize) {
        (self.b.rows(), self.a.cols())
    }
}

/// A full tensor saved with the adapter (PEFT `modules_to_save`, e.g. a classifier head).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// SHA-256 over the adapter's config and weights files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterDigest(pub [u8; 32]);

impl fmt::Display for AdapterDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for AdapterDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdapterDigest({self})")
    }
}

/// A validated PEFT LoRA adapter held in memory as f32.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The adapter's id: its directory name, or the name it was registered under.
    pub name: String,
    pub path: PathBuf,
    pub config: AdapterConfig,
    /// Factors per module path, without the `base_model.model.` prefix.
    pub modules: BTreeMap<String, LoraModule>,
    /// `modules_to_save` tensors, keyed `<module>.<param>` without the prefix.
    pub saved_modules: BTreeMap<String, SavedTensor>,
    /// The classification task the adapter was trained for (`knots_task.json`), if recorded.
    pub task: Option<TaskInfo>,
    pub digest: AdapterDigest,
}

/// `knots_task.json` beside an adapter: the task it solves and its labels, so a server can build
/// its classification head.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskInfo {
    /// Task name; defaults to the adapter's name.
    #[serde(default)]
    pub task: Option<String>,
    /// Class names, in the order of the classifier's rows.
    pub labels: Vec<String>,
    /// Natural-language text per class for label-text heads; defaults to the labels.
    #[serde(default)]
    pub label_texts: Option<Vec<String>>,
}

impl LoraAdapter {
    /// Reads and validates the adapter in `dir`; its name is the directory name.
    pub fn load(dir: &Path) -> Result<Self, AdapterError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Self::load_named(dir, name)
    }

    /// Reads and validates the adapter in `dir` under the registry name `name`.
    pub fn load_named(dir: &Path, name: impl Into<String>) -> Result<Self, AdapterError> {
        read::load(dir, name.into())
    }

    /// This adapter's own update as a low-rank delta (`b` carries the scale).
    pub fn delta(&self) -> MergedDelta {
        let modules = self
            .modules
            .iter()
            .map(|(path, m)| {
                let mut b = m.b.clone();
                b.scale(m.scale as f32);
                (path.clone(), ModuleDelta::LowRank { b, a: m.a.clone() })
            })
            .collect();
        MergedDelta { modules }
    }
}
