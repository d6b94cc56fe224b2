//! Every case of the KnOTS and Core Space reference implementations' golden outputs
//! (tests/fixtures/knots-golden, tests/fixtures/core-golden) reproduced through the code path of
//! `knots merge --format delta`.

use knots::adapters::LoraAdapter;
use knots::cli::merge::{Format, MergeArgs, MergeFlags, run};
use knots::merge::{Factors, Method, align};
use serde_json::Value;

use crate::common::{fixture, read_matrices};

const TOLERANCE: f64 = 1e-4;

fn case(name: &str) -> (std::path::PathBuf, Value) {
    case_in("knots-golden", name)
}

fn case_in(set: &str, name: &str) -> (std::path::PathBuf, Value) {
    let dir = fixture(set).join(name);
    let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

fn merge_case(name: &str) {
    merge_case_in("knots-golden", name);
}

fn merge_case_in(set: &str, name: &str) {
    let (dir, case) = case_in(set, name);
    let hp = &case["hyperparameters"];
    let out = tempfile::tempdir().unwrap();
    let method = case["method"].as_str().unwrap().parse::<Method>().unwrap();
    let args = MergeArgs {
        adapters: case["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| dir.join(a.as_str().unwrap()))
            .collect(),
        out: out.path().join("merged"),
        merge: MergeFlags {
            method: Some(method),
            density: hp["density"].as_f64(),
            lambda: hp["lambda"].as_f64(),
            isotropize: hp["isotropize"].as_bool() == Some(true) && !method.always_isotropic(),
            ..MergeFlags::default()
        },
        weights: None,
        format: Format::Delta,
        rank: None,
    };
    run(&args).unwrap();

    let got = read_matrices(&out.path().join("merged/delta.safetensors"));
    let want = read_matrices(&dir.join("expected.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{name}: keys"
    );
    let mut worst = 0.0f64;
    for (key, expected) in &want {
        let err = got[key].relative_error(expected);
        assert!(
            err <= TOLERANCE,
            "{name}: {key}: relative error {err:.3e} > {TOLERANCE:e}"
        );
        worst = worst.max(err);
    }
    eprintln!("{name}: worst relative error {worst:.2e}");
}

#[test]
fn knots_ties() {
    merge_case("knots_ties");
}

#[test]
fn knots_ta() {
    merge_case("knots_ta");
}

#[test]
fn ties() {
    merge_case("ties");
}

#[test]
fn ta_sum() {
    merge_case("ta_sum");
}

#[test]
fn knots_ties_with_a_duplicated_adapter() {
    merge_case("knots_ties_dup");
}

#[test]
fn core_ta() {
    merge_case_in("core-golden", "core_ta");
}

#[test]
fn core_ties() {
    merge_case_in("core-golden", "core_ties");
}

#[test]
fn core_tsv() {
    merge_case_in("core-golden", "core_tsv");
}

#[test]
fn core_iso_c() {
    merge_case_in("core-golden", "core_iso_c");
}

/// The factored SVD keeps as many components as the reference and finds its singular values.
#[test]
fn kept_ranks_and_singular_values_match_the_reference() {
    for name in ["knots_ties", "knots_ta", "knots_ties_dup"] {
        let (dir, case) = case(name);
        let adapters: Vec<LoraAdapter> = case["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| LoraAdapter::load(&dir.join(a.as_str().unwrap())).unwrap())
            .collect();
        let singular = read_matrices(&dir.join("singular_values.safetensors"));
        for (key, kept) in case["expected_meta"]["kept_rank_per_key"]
            .as_object()
            .unwrap()
        {
            let module = key.strip_suffix(".weight").unwrap();
            let factors: Vec<Factors<'_>> = adapters
                .iter()
                .map(|a| {
                    let m = &a.modules[module];
                    Factors {
                        b: &m.b,
                        a: &m.a,
                        scale: m.scale,
                    }
                })
                .collect();
            let aligned = align(module, &factors).unwrap();
            assert_eq!(
                aligned.rank() as u64,
                kept.as_u64().unwrap(),
                "{name}: {key}: kept rank"
            );
            let want = singular[key].as_slice();
            for (j, (&s, &w)) in aligned.s.iter().zip(want).enumerate() {
                let rel = (s - f64::from(w)).abs() / f64::from(w);
                assert!(rel < 1e-5, "{name}: {key}: singular value {j}: {s} vs {w}");
            }
        }
    }
}
