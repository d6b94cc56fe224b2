//! The merge engine: pure math from adapter factors to a [`MergedDelta`]. No I/O, no async.

mod delta;

pub use delta::{MergedDelta, ModuleDelta};
