//! Terminal progress bars for long CLI work. They appear only on a terminal and only once a
//! stage has run for a moment, so short merges stay quiet. When stderr is not a terminal (CI
//! logs, background runs), each finished stage of a long run prints one plain line instead.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::merge::Progress;

/// How long a stage runs before its bar is drawn.
const SHOW_AFTER: Duration = Duration::from_millis(300);

/// A [`Progress`] that draws an indicatif bar on stderr.
pub struct Bar {
    // std Mutex: held only to swap the bar at a stage change, never across blocking work.
    stage: Mutex<Option<Stage>>,
}

struct Stage {
    name: &'static str,
    bar: ProgressBar,
    /// When the stage began; `None` once the bar is drawn.
    hidden_since: Option<Instant>,
}

impl Stage {
    fn end(self) {
        self.bar.finish_and_clear();
        let elapsed = self.bar.elapsed();
        if elapsed > SHOW_AFTER && !std::io::stderr().is_terminal() {
            eprintln!(
                "{}: {} steps in {:.1} s",
                self.name,
                self.bar.position(),
                elapsed.as_secs_f64()
            );
        }
    }
}

impl Bar {
    pub fn new() -> Self {
        Self {
            stage: Mutex::new(None),
        }
    }

    pub fn finish(&self) {
        if let Ok(mut guard) = self.stage.lock()
            && let Some(stage) = guard.take()
        {
            stage.end();
        }
    }
}

impl Progress for Bar {
    fn start(&self, stage: &'static str, total: u64) {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_message(stage);
        let stage = Stage {
            name: stage,
            bar,
            hidden_since: Some(Instant::now()),
        };
        if let Ok(mut guard) = self.stage.lock()
            && let Some(old) = guard.replace(stage)
        {
            old.end();
        }
    }

    fn advance(&self, steps: u64) {
        let Ok(mut guard) = self.stage.lock() else {
            return;
        };
        if let Some(stage) = guard.as_mut() {
            stage.bar.inc(steps);
            if stage.hidden_since.is_some_and(|t| t.elapsed() > SHOW_AFTER) {
                stage.bar.set_draw_target(ProgressDrawTarget::stderr());
                stage.hidden_since = None;
            }
        }
    }
}

/// Whether a step of `steps` gets a plain log line (about every tenth, when stderr is no
/// terminal and the bar is hidden).
pub fn log_step(step: usize, steps: usize) -> bool {
    (step.is_multiple_of((steps / 10).max(1)) || step == steps) && !std::io::stderr().is_terminal()
}

/// A bar for training steps that shows the latest loss (drawn only on a terminal).
pub fn loss_bar(task: &str, steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    let style =
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} loss {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_prefix(task.to_string());
    bar
}
