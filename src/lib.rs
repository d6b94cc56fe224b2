//! knots: serve, merge and evaluate sets of LoRA adapters on one base model.
//!
//! Data flow (see the README): PEFT adapters are read by [`adapters`], merged by [`merge`]
//! (KnOTS, TIES, DARE, task arithmetic) into a [`merge::MergedDelta`], which the model engine
//! applies inside its linear layers.

pub mod adapters;
pub mod allocator;
pub mod cli;
pub mod engine;
pub mod eval;
pub mod hub;
pub mod labels;
pub mod matrix;
pub mod merge;
pub mod objects;
pub mod server;
pub mod train;
mod wide;
