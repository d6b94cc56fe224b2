//! The merge engine: pure math from adapter factors to a [`MergedDelta`]. No I/O, no async.
//!
//! Step in the data flow: a resolved adapter set and its [`MergeParams`] become one
//! `MergedDelta`, which the cache stores and the model engine applies.

mod align;
mod align_cache;
mod core;
mod dare;
mod delta;
mod delta_file;
mod device;
mod error;
mod frame;
mod key;
mod magnitude;
mod methods;
mod params;
mod plan;
mod progress;
mod ties;
mod truncate;

pub use align::{Alignment, Factors, SVD_CUT, align, align_with_cut, dense_concat};
pub use align_cache::{AlignmentCache, AlignmentStats};
pub use core::{Bases, CORE_CUT, CoreBasis, core_basis};
pub use delta::{MergedDelta, ModuleDelta};
pub use delta_file::{DELTA_FORMAT_VERSION, DeltaFileError};
pub use error::MergeError;
pub use key::{KeyMember, MergeKey};
pub use methods::{merge, merge_cached, merge_on};
pub use params::{MergeOptions, MergeParams, Method};
pub use plan::MergeInput;
pub use progress::{Progress, Silent};
pub use truncate::{Truncated, truncate};

/// Deterministic pseudo-random values in [-0.5, 0.5) for the merge tests (xorshift, no RNG crate).
#[cfg(test)]
pub(crate) fn test_values(seed: u32) -> impl FnMut() -> f32 {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state as f32 / u32::MAX as f32) - 0.5
    }
}
