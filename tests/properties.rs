//! Invariants of the merge methods on small random adapter sets.

use knots::adapters::LoraAdapter;
use knots::merge::{
    self, Factors, MergeInput, MergeOptions, MergeParams, MergedDelta, Method, Silent, align,
};
use proptest::prelude::*;

use crate::common::{max_relative_error, random_adapter};

/// A random set: `n` adapters of ranks 1..=3 over two modules, the second missing from the last
/// adapter (a module an adapter lacks must contribute nothing).
fn random_set(seed: u64, n: usize, out: usize, inp: usize) -> Vec<LoraAdapter> {
    (0..n)
        .map(|i| {
            let modules: &[(&str, usize, usize)] = if i + 1 == n && n > 1 {
                &[("layers.0.q", out, inp)]
            } else {
                &[("layers.0.q", out, inp), ("layers.0.v", inp, out)]
            };
            let r = 1 + (seed as usize + i) % 3;
            random_adapter(
                &format!("task_{i}"),
                seed * 31 + i as u64,
                r,
                2.0 * r as f64,
                modules,
            )
        })
        .collect()
}

fn run(adapters: &[LoraAdapter], method: Method, options: MergeOptions) -> MergedDelta {
    let inputs: Vec<_> = adapters.iter().map(MergeInput::new).collect();
    merge::merge(
        &inputs,
        &MergeParams::new(method, options).unwrap(),
        &Silent,
    )
    .unwrap()
}

fn opts(lambda: f64, density: Option<f64>, dare_p: Option<f64>, seed: u64) -> MergeOptions {
    MergeOptions {
        lambda: Some(lambda),
        density,
        dare_p,
        seed: Some(seed),
        ..MergeOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn adapter_order_does_not_change_any_result(seed in 0u64..1000, n in 2usize..5, shift in 1usize..4) {
        let adapters = random_set(seed, n, 7, 5);
        let mut rotated = adapters.clone();
        rotated.rotate_left(shift % n);
        for method in Method::ALL {
            let options = opts(0.7, None, Some(0.3), seed);
            let err = max_relative_error(&run(&rotated, method, options), &run(&adapters, method, options));
            prop_assert!(err < 1e-6, "{method}: {err}");
        }
    }

    #[test]
    fn knots_ta_equals_ta(seed in 0u64..1000, n in 1usize..5, lambda in -2.0f64..2.0) {
        let adapters = random_set(seed, n, 6, 9);
        let options = opts(lambda, None, None, 0);
        let err = max_relative_error(&run(&adapters, Method::KnotsTa, options), &run(&adapters, Method::Ta, options));
        prop_assert!(err < 1e-6, "{err}");
    }

    #[test]
    fn factored_svd_equals_the_dense_svd(seed in 0u64..1000, n in 1usize..5, out in 3usize..12, inp in 3usize..12) {
        let adapters = random_set(seed, n, out, inp);
        let factors: Vec<Factors<'_>> = adapters
            .iter()
            .map(|a| {
                let m = &a.modules["layers.0.q"];
                Factors { b: &m.b, a: &m.a, scale: m.scale }
            })
            .collect();
        let aligned = align("layers.0.q", &factors).unwrap();
        let dense = merge::dense_concat(&factors);
        let svd = dense.thin_svd().unwrap();
        let s = svd.S().column_vector();
        let dense_s: Vec<f64> = (0..s.nrows()).map(|j| s[j]).filter(|&x| x > merge::SVD_CUT).collect();
        prop_assert_eq!(aligned.rank(), dense_s.len());
        for (a, d) in aligned.s.iter().zip(&dense_s) {
            prop_assert!((a - d).abs() <= 1e-9 * d.max(1.0), "{a} vs {d}");
        }
        // U·rep_i reconstructs τ_i.
        for (i, rep) in aligned.reps.iter().enumerate() {
            let rebuilt = aligned.u.matmul(rep);
            let want = knots::matrix::Matrix::from_fn(out, inp, |r, c| dense[(r, i * inp + c)] as f32);
            let err = rebuilt.relative_error(&want);
            prop_assert!(err < 1e-5, "adapter {i}: {err}");
        }
    }

    #[test]
    fn dare_with_p_zero_equals_no_dare(seed in 0u64..1000, n in 1usize..4) {
        let adapters = random_set(seed, n, 6, 6);
        let p0 = opts(0.8, None, Some(0.0), seed);
        let pairs = [
            (Method::Dare, Method::Ta),
            (Method::DareTies, Method::Ties),
            (Method::KnotsDareTies, Method::KnotsTies),
        ];
        for (with, without) in pairs {
            let no_dare = opts(0.8, Some(1.0), None, seed);
            let err = max_relative_error(&run(&adapters, with, p0), &run(&adapters, without, no_dare));
            prop_assert!(err < 1e-6, "{with}: {err}");
        }
    }
}

#[test]
fn ties_on_one_adapter_at_full_density_returns_it() {
    let adapter = random_set(5, 1, 8, 6);
    let merged = run(&adapter, Method::Ties, opts(1.0, Some(1.0), None, 0));
    assert!(max_relative_error(&merged, &adapter[0].delta()) < 1e-6);
    let merged = run(&adapter, Method::KnotsTies, opts(1.0, Some(1.0), None, 0));
    assert!(max_relative_error(&merged, &adapter[0].delta()) < 1e-5);
}

#[test]
fn dare_is_unbiased_over_seeds() {
    let adapters = random_set(9, 3, 8, 8);
    let want = run(&adapters, Method::Ta, MergeOptions::default());
    let seeds = 400;
    let mut mean: Option<MergedDelta> = None;
    for seed in 0..seeds {
        let delta = run(&adapters, Method::Dare, opts(1.0, None, Some(0.5), seed));
        let dense: MergedDelta = MergedDelta {
            modules: delta
                .modules
                .iter()
                .map(|(k, m)| (k.clone(), merge::ModuleDelta::Dense(m.to_dense())))
                .collect(),
        };
        mean = Some(match mean {
            None => dense,
            Some(mut acc) => {
                for (k, m) in acc.modules.iter_mut() {
                    let (merge::ModuleDelta::Dense(a), merge::ModuleDelta::Dense(b)) =
                        (m, &dense.modules[k])
                    else {
                        unreachable!()
                    };
                    a.as_mut_slice()
                        .iter_mut()
                        .zip(b.as_slice())
                        .for_each(|(x, y)| *x += y);
                }
                acc
            }
        });
    }
    let mut mean = mean.unwrap();
    for m in mean.modules.values_mut() {
        if let merge::ModuleDelta::Dense(a) = m {
            a.scale(1.0 / seeds as f32);
        }
    }
    // Each entry's mean has a relative standard deviation of √(p/(1−p)/seeds) = 5 % here; without
    // the 1/(1−p) rescale the mean would be off by 50 %.
    let err = max_relative_error(&mean, &want);
    assert!(
        err < 0.12,
        "mean of DARE over {seeds} seeds is {err:.3} away from the update"
    );
    let single = run(&adapters, Method::Dare, opts(1.0, None, Some(0.5), 0));
    assert!(
        max_relative_error(&single, &want) > 0.5,
        "one DARE draw should differ"
    );
}
