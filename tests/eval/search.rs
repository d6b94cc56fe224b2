//! The greedy search: λ first, then density or DARE p; DARE best of several seeds.

use knots::eval::{SearchGrid, greedy_search};
use knots::merge::{MergeParams, Method};

/// A validation score peaked at (λ*, d*, p*), with a bonus for one seed.
fn peaked(
    lambda: f64,
    density: f64,
    p: f64,
    good_seed: u64,
) -> impl FnMut(&MergeParams) -> Result<f64, knots::eval::EvalError> {
    move |m: &MergeParams| {
        let seed_bonus = if m.seed == good_seed { 0.01 } else { 0.0 };
        Ok(
            1.0 - (m.lambda - lambda).abs() - (m.density - density).abs() - (m.dare_p - p).abs()
                + seed_bonus,
        )
    }
}

#[test]
fn the_default_grids_are_the_papers() {
    let g = SearchGrid::default();
    assert_eq!(
        g.lambdas,
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    );
    assert_eq!(g.densities, g.lambdas);
    assert_eq!(g.dare_ps, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]);
}

#[test]
fn ties_searches_lambda_then_density() {
    let grid = SearchGrid::default();
    let out = greedy_search(Method::KnotsTies, &grid, peaked(0.6, 0.3, 0.1, 99)).unwrap();
    assert_eq!((out.best.lambda, out.best.density), (0.6, 0.3));
    assert_eq!(out.trials.len(), 20);
    // λ is searched at the method's default density, 0.2.
    assert!(out.trials[..10].iter().all(|t| t.params.density == 0.2));
    assert!(out.trials[10..].iter().all(|t| t.params.lambda == 0.6));
}

#[test]
fn task_arithmetic_searches_only_lambda() {
    let out = greedy_search(
        Method::Ta,
        &SearchGrid::default(),
        peaked(0.4, 1.0, 0.1, 99),
    )
    .unwrap();
    assert_eq!(out.best.lambda, 0.4);
    assert_eq!(out.trials.len(), 10);
}

#[test]
fn dare_searches_p_and_keeps_the_best_seed() {
    let grid = SearchGrid::default();
    let out = greedy_search(Method::DareTies, &grid, peaked(0.9, 1.0, 0.7, 2)).unwrap();
    assert_eq!(
        (out.best.lambda, out.best.dare_p, out.best.seed),
        (0.9, 0.7, 2)
    );
    assert_eq!(out.best.density, 1.0);
    assert_eq!(out.trials.len(), (10 + 9) * 3);
    assert!((out.score - 1.01).abs() < 1e-9);
}

#[test]
fn ties_keep_the_earlier_grid_point_and_errors_stop_the_search() {
    let flat = |_: &MergeParams| Ok(0.5);
    let out = greedy_search(Method::Ties, &SearchGrid::default(), flat).unwrap();
    assert_eq!((out.best.lambda, out.best.density), (0.1, 0.2));
    let nan = |_: &MergeParams| Ok(f64::NAN);
    assert!(greedy_search(Method::Ta, &SearchGrid::default(), nan).is_err());
    let empty = SearchGrid {
        lambdas: vec![],
        ..SearchGrid::default()
    };
    assert!(greedy_search(Method::Ta, &empty, flat).is_err());
}

#[test]
fn core_methods_search_isotropize_and_the_common_fraction() {
    let grid = SearchGrid::default();
    let score = |m: &MergeParams| {
        let flat = if m.isotropize { 1.0 } else { 0.5 };
        Ok(flat - (m.lambda - 0.3).abs() - (m.common_fraction - 0.7).abs())
    };
    let out = greedy_search(Method::CoreTsv, &grid, score).unwrap();
    assert!(out.best.isotropize);
    assert_eq!(out.best.lambda, 0.3);
    // λ once per isotropize setting.
    assert_eq!(out.trials.len(), 20);
    assert_eq!(grid.points(Method::CoreTsv), 20);
    let out = greedy_search(Method::CoreIsoCts, &grid, score).unwrap();
    assert_eq!((out.best.lambda, out.best.common_fraction), (0.3, 0.7));
    assert_eq!(out.trials.len() as u64, grid.points(Method::CoreIsoCts));
    assert_eq!(out.trials.len(), 14);
}
