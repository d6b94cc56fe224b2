//! Progress reporting for long merges, without tying the math to a terminal library.

/// Receives the stages of a merge and their progress. Implementations must be cheap: `advance`
/// is called once per module or adapter, possibly from several threads.
pub trait Progress: Sync {
    /// A new stage with `total` steps begins.
    fn start(&self, _stage: &'static str, _total: u64) {}
    /// `steps` more steps of the current stage are done.
    fn advance(&self, _steps: u64) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
