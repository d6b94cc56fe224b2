//! The task suite definition (`data/suite.toml`): which tasks the benchmark runs, where each
//! task's texts come from in the data cache, its classes with their label texts (for
//! label-text heads) and label words (for causal-LM prompts), and the per-class split caps.
//!
//! Step in the data flow: first. [`Suite::load`] parses and validates the file; the loader
//! ([`crate::eval::load_task`]) then reads each task's texts from the cache and splits them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EvalError;
use super::text::TextRules;

/// Per-class caps on the number of examples in each split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caps {
    pub train: usize,
    pub val: usize,
    pub test: usize,
}

/// The whole suite, as written in the suite file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// Seed of the split hash: a different seed draws different splits.
    pub seed: u64,
    /// Longest text kept, in characters, unless a task sets its own.
    pub max_chars: usize,
    /// Shorter cleaned texts are dropped.
    pub min_chars: usize,
    /// Per-class caps of a full run.
    pub caps: Caps,
    /// Per-class caps of a `--quick` run, applied to the full splits (so a quick split is a
    /// subset of the full one).
    pub quick_caps: Caps,
    #[serde(rename = "task")]
    pub tasks: Vec<TaskDef>,
}

/// One classification task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    pub name: String,
    pub description: String,
    /// Instruction-style prompt for causal-LM adapters; `{text}` is replaced by the example and
    /// the model answers with one of the label words.
    pub prompt: String,
    pub source: SourceDef,
    #[serde(default)]
    pub max_chars: Option<usize>,
    #[serde(default)]
    pub keep_newlines: bool,
    /// Drop texts longer than `max_chars` instead of cutting them (for inputs whose end matters,
    /// such as a claim after its passage).
    #[serde(default)]
    pub drop_long: bool,
    #[serde(rename = "class")]
    pub classes: Vec<ClassDef>,
}

/// Where a task's records come from, relative to the data cache. Each record carries a raw key;
/// a class owns the keys listed in its `keys`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "format", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceDef {
    /// VADER ground-truth files (`id<TAB>mean rating<TAB>text`): key `positive` when the mean
    /// rating is above `threshold`, `negative` below `-threshold`; others are dropped.
    Vader { files: Vec<String>, threshold: f64 },
    /// One text file per example in `root/<key>/`.
    Folders { root: String },
    /// A BIG-bench `task.json`: key = the choice with the highest target score (examples with a
    /// tie for the best score are dropped). `strip_prefix`/`strip_suffix` are removed from inputs.
    Bigbench {
        file: String,
        #[serde(default)]
        strip_prefix: Option<String>,
        #[serde(default)]
        strip_suffix: Option<String>,
    },
    /// Debian fortune files (entries separated by `%` lines): key = the file's path, so a class
    /// lists the fortune files it is made of. Attributions (`-- Author`) are removed.
    Fortunes,
}

/// One class of a task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassDef {
    pub name: String,
    /// Raw source keys that belong to this class.
    pub keys: Vec<String>,
    /// Natural-language description embedded by label-text heads.
    pub label_text: String,
    /// The word a causal-LM adapter answers for this class.
    pub label_word: String,
}

impl Suite {
    /// Reads and validates a suite file.
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses and validates suite text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, EvalError> {
        let suite: Suite = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            EvalError::Suite {
                file: path.to_owned(),
                reason: match line {
                    Some(line) => format!("line {line}: {}", e.message().trim_end()),
                    None => e.message().trim_end().to_owned(),
                },
            }
        })?;
        suite.validate().map_err(|reason| EvalError::Suite {
            file: path.to_owned(),
            reason,
        })?;
        Ok(suite)
    }

    /// The task called `name`.
    pub fn task(&self, name: &str) -> Option<&TaskDef> {
        self.tasks.iter().find(|t| t.name == name)
    }

    /// The caps of a full or a `--quick` run.
    pub fn caps(&self, quick: bool) -> Caps {
        if quick { self.quick_caps } else { self.caps }
    }

    fn validate(&self) -> Result<(), String> {
        if self.tasks.is_empty() {
            return Err("the suite has no [[task]]".into());
        }
        for (what, caps) in [("caps", self.caps), ("quick_caps", self.quick_caps)] {
            if caps.train == 0 || caps.val == 0 || caps.test == 0 {
                return Err(format!(
                    "{what}: train, val and test must all be at least 1"
                ));
            }
        }
        if self.max_chars == 0 {
            return Err("max_chars must be at least 1".into());
        }
        let mut names = HashSet::new();
        for task in &self.tasks {
            if !names.insert(task.name.as_str()) {
                return Err(format!("task {} is defined twice", task.name));
            }
            task.validate()
                .map_err(|reason| format!("task {}: {reason}", task.name))?;
        }
        Ok(())
    }
}

impl TaskDef {
    /// The cleaning rules of this task under `suite`.
    pub fn text_rules(&self, suite: &Suite) -> TextRules {
        TextRules {
            max_chars: self.max_chars.unwrap_or(suite.max_chars),
            keep_newlines: self.keep_newlines,
            strip_attribution: matches!(self.source, SourceDef::Fortunes),
        }
    }

    /// Fills the prompt template with one example's text.
    pub fn render_prompt(&self, text: &str) -> String {
        self.prompt.replace("{text}", text)
    }

    /// The class names, in label order.
    pub fn class_names(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.name.as_str()).collect()
    }

    fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err("the name must be ASCII letters, digits, '_' or '-'".into());
        }
        if self.classes.len() < 2 {
            return Err(format!(
                "needs at least 2 classes, has {}",
                self.classes.len()
            ));
        }
        if !self.prompt.contains("{text}") {
            return Err("the prompt must contain {text}".into());
        }
        if self.max_chars == Some(0) {
            return Err("max_chars must be at least 1".into());
        }
        if let SourceDef::Vader { threshold, .. } = self.source
            && !(threshold.is_finite() && threshold >= 0.0)
        {
            return Err(format!(
                "threshold must be finite and >= 0, got {threshold}"
            ));
        }
        self.validate_classes()
    }

    fn validate_classes(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        let mut words = HashSet::new();
        let mut keys = HashSet::new();
        for class in &self.classes {
            let c = &class.name;
            if !names.insert(c.as_str()) {
                return Err(format!("class {c} is defined twice"));
            }
            if class.label_text.trim().is_empty() || class.label_word.trim().is_empty() {
                return Err(format!(
                    "class {c}: label_text and label_word must not be empty"
                ));
            }
            if !words.insert(class.label_word.as_str()) {
                return Err(format!(
                    "class {c}: label word {:?} is used twice",
                    class.label_word
                ));
            }
            if class.keys.is_empty() {
                return Err(format!("class {c}: keys must not be empty"));
            }
            for key in &class.keys {
                if !keys.insert(key.as_str()) {
                    return Err(format!("class {c}: key {key:?} belongs to two classes"));
                }
            }
        }
        Ok(())
    }
}

/// Where the suite and the cache are by default, relative to the repository root.
pub fn default_paths() -> (PathBuf, PathBuf) {
    (
        PathBuf::from("data/suite.toml"),
        PathBuf::from("data/cache"),
    )
}
