//! The benchmark's data and metrics: the task suite (real labelled texts fetched by `make data`
//! into `data/cache/`), deterministic splits, the paper's per-task and joint metrics, the
//! greedy hyperparameter search, confidence intervals over task combinations, and reports.
//!
//! Data flow: [`Suite`] (suite file) → [`load_task`] (read [`sources`], clean [`text`], dedup
//! and [`split`]) → a model scores the splits → [`metrics`] and [`stats`] → [`Report`] (markdown,
//! JSON, [`svg`]). The search ([`greedy_search`]) picks merge parameters on the validation split.

mod bench;
mod error;
mod label_words;
mod load;
pub mod metrics;
pub mod report;
mod search;
pub mod sources;
pub mod split;
pub mod stats;
mod suite;
pub mod svg;
pub mod text;

pub use bench::{Bench, BenchSettings};
pub use error::EvalError;
pub use label_words::{LabelWordBench, LabelWordSettings, LabelWordTask};
pub use load::{TaskData, load_suite, load_task};
pub use report::{LabelWordReport, Report};
pub use search::{SearchGrid, SearchOutcome, Trial, greedy_search};
pub use split::{Example, Splits};
pub use suite::{Caps, ClassDef, SourceDef, Suite, TaskDef, default_paths};
