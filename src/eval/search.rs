//! The paper's greedy hyperparameter search, as a pure function over an evaluator closure.
//!
//! For a method: first λ over its grid (density and DARE p at the method's defaults), then, with
//! the best λ fixed, the density (TIES-style methods), the DARE drop rate p (DARE methods) or the
//! common fraction (Iso-CTS). A DARE configuration is scored as the best over several seeds, and
//! the winning seed is kept. Core Space methods that can be isotropized run this search once per
//! `isotropize` setting in the grid (a flat spectrum moves the best λ) and keep the better one.
//! Ties between grid points keep the earlier value.
//!
//! Step in the data flow: `knots eval` runs it on the validation split for every method, then
//! evaluates the chosen parameters on the test split.

use crate::merge::{MergeOptions, MergeParams, Method};

use super::EvalError;

/// The grids searched. [`SearchGrid::default`] is the paper's: λ and density 0.1–1.0, p 0.1–0.9
/// in steps of 0.1, DARE seeds 0, 1, 2; isotropize off and on; common fraction 0.6–0.9.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchGrid {
    pub lambdas: Vec<f64>,
    pub densities: Vec<f64>,
    pub dare_ps: Vec<f64>,
    pub dare_seeds: Vec<u64>,
    /// The `isotropize` settings tried for Core Space methods that do not always isotropize.
    pub isotropize: Vec<bool>,
    /// Iso-CTS' common fractions.
    pub common_fractions: Vec<f64>,
}

impl Default for SearchGrid {
    fn default() -> Self {
        let tenths = |from: u32, to: u32| (from..=to).map(|i| f64::from(i) / 10.0).collect();
        Self {
            lambdas: tenths(1, 10),
            densities: tenths(1, 10),
            dare_ps: tenths(1, 9),
            dare_seeds: vec![0, 1, 2],
            isotropize: vec![false, true],
            common_fractions: tenths(6, 9),
        }
    }
}

impl SearchGrid {
    /// How many times [`greedy_search`] calls its evaluator for `method` (for progress).
    pub fn points(&self, method: Method) -> u64 {
        let seeds = if method.uses_dare() {
            self.dare_seeds.len()
        } else {
            1
        };
        let second = if method.uses_dare() {
            self.dare_ps.len()
        } else if method.uses_ties() {
            self.densities.len()
        } else if method == Method::CoreIsoCts {
            self.common_fractions.len()
        } else {
            0
        };
        let passes = if method.is_core() && !method.always_isotropic() {
            self.isotropize.len()
        } else {
            1
        };
        ((self.lambdas.len() + second) * seeds * passes) as u64
    }
}

/// One evaluated point of the search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trial {
    pub params: MergeParams,
    pub score: f64,
}

/// What the search found: the best parameters, their score, and every point evaluated in order.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOutcome {
    pub best: MergeParams,
    pub score: f64,
    pub trials: Vec<Trial>,
}

/// Runs the greedy search for `method` over `grid`, calling `evaluate` once per point (and per
/// seed for DARE methods). `evaluate` returns the validation score to maximise.
pub fn greedy_search<F>(
    method: Method,
    grid: &SearchGrid,
    mut evaluate: F,
) -> Result<SearchOutcome, EvalError>
where
    F: FnMut(&MergeParams) -> Result<f64, EvalError>,
{
    if grid.lambdas.is_empty() || (method.uses_dare() && grid.dare_seeds.is_empty()) {
        return Err(EvalError::metric("search", "an empty grid"));
    }
    let mut search = Search {
        method,
        seeds: &grid.dare_seeds,
        trials: Vec::new(),
        evaluate: &mut evaluate,
    };
    let isotropize: Vec<Option<bool>> = if method.is_core() && !method.always_isotropic() {
        grid.isotropize.iter().map(|&i| Some(i)).collect()
    } else {
        vec![None]
    };
    let mut best: Option<Trial> = None;
    for iso in isotropize {
        let base = MergeOptions {
            isotropize: iso,
            ..MergeOptions::default()
        };
        let found = search.greedy(grid, base)?;
        if best.is_none_or(|b| found.score > b.score) {
            best = Some(found);
        }
    }
    let best = best.ok_or_else(|| EvalError::metric("search", "an empty isotropize grid"))?;
    Ok(SearchOutcome {
        best: best.params,
        score: best.score,
        trials: search.trials,
    })
}

struct Search<'a, F> {
    method: Method,
    seeds: &'a [u64],
    trials: Vec<Trial>,
    evaluate: &'a mut F,
}

impl<F> Search<'_, F>
where
    F: FnMut(&MergeParams) -> Result<f64, EvalError>,
{
    /// λ over its grid from `base`, then the method's second parameter with that λ.
    fn greedy(&mut self, grid: &SearchGrid, base: MergeOptions) -> Result<Trial, EvalError> {
        let method = self.method;
        let mut best = self.best_of(grid.lambdas.iter().map(|&l| MergeOptions {
            lambda: Some(l),
            ..base
        }))?;
        let lambda = Some(best.params.lambda);
        let second: Vec<MergeOptions> = if method.uses_dare() {
            let ps = grid.dare_ps.iter().map(|&p| MergeOptions {
                lambda,
                dare_p: Some(p),
                ..base
            });
            ps.collect()
        } else if method.uses_ties() {
            let ds = grid.densities.iter().map(|&d| MergeOptions {
                lambda,
                density: Some(d),
                ..base
            });
            ds.collect()
        } else if method == Method::CoreIsoCts {
            let fs = grid.common_fractions.iter().map(|&f| MergeOptions {
                lambda,
                common_fraction: Some(f),
                ..base
            });
            fs.collect()
        } else {
            Vec::new()
        };
        if !second.is_empty() {
            let candidate = self.best_of(second.into_iter())?;
            if candidate.score > best.score {
                best = candidate;
            }
        }
        Ok(best)
    }

    /// The best of `points` (the first on ties).
    fn best_of(&mut self, points: impl Iterator<Item = MergeOptions>) -> Result<Trial, EvalError> {
        let mut best: Option<Trial> = None;
        for options in points {
            let trial = self.score(options)?;
            if best.is_none_or(|b| trial.score > b.score) {
                best = Some(trial);
            }
        }
        best.ok_or_else(|| EvalError::metric("search", "an empty grid"))
    }

    /// Scores one point: once, or for DARE methods the best over the seeds.
    fn score(&mut self, options: MergeOptions) -> Result<Trial, EvalError> {
        let seeds: Vec<Option<u64>> = if self.method.uses_dare() {
            self.seeds.iter().map(|&s| Some(s)).collect()
        } else {
            vec![None]
        };
        let mut best: Option<Trial> = None;
        for seed in seeds {
            let params = MergeParams::new(self.method, MergeOptions { seed, ..options })?;
            let score = (self.evaluate)(&params)?;
            if score.is_nan() {
                return Err(EvalError::metric("search", "the evaluator returned NaN"));
            }
            let trial = Trial { params, score };
            self.trials.push(trial);
            if best.is_none_or(|b| score > b.score) {
                best = Some(trial);
            }
        }
        best.ok_or_else(|| EvalError::metric("search", "no DARE seeds"))
    }
}
