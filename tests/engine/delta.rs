//! The LoRA-aware linear layer: a merged set applied as low-rank factors gives the same logits
//! as the same ΔW applied dense; unknown modules and wrong shapes are errors; the converted
//! tensors are cached per `Arc<MergedDelta>`.

use std::sync::Arc;

use knots::adapters::LoraAdapter;
use knots::engine::{EngineError, KvCache, dense_modules};
use knots::matrix::Matrix;
use knots::merge::{
    MergeInput, MergeOptions, MergeParams, MergedDelta, Method, ModuleDelta, Silent, merge,
};

use super::{max_abs_diff, reference, smollm2};

fn logits(delta: Option<&Arc<MergedDelta>>, prompt: &[u32]) -> Vec<f32> {
    let model = smollm2();
    let loaded = delta.map(|d| model.load_delta(d).unwrap());
    model
        .model
        .forward(prompt, &mut KvCache::default(), loaded.as_deref())
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn low_rank_merge_equals_dense_delta() {
    let shout = LoraAdapter::load(&reference("smollm2/adapters/shout")).unwrap();
    // A second adapter: the same factors on half the modules, with flipped sign.
    let mut other = shout.clone();
    other.name = "other".into();
    other
        .modules
        .retain(|k, _| k.contains("v_proj") || k.contains("q_proj"));
    other.modules.values_mut().for_each(|m| m.b.scale(-0.5));
    let inputs = [MergeInput::new(&shout), MergeInput::new(&other)];
    let params = MergeParams::new(Method::KnotsTa, MergeOptions::default()).unwrap();
    let merged = merge(&inputs, &params, &Silent).unwrap();
    assert!(merged.is_low_rank());
    let low = Arc::new(merged);
    let dense = Arc::new(dense_modules(&low));
    let prompt = smollm2().encode_plain("The capital of France is").unwrap();
    let base = logits(None, &prompt);
    let a = logits(Some(&low), &prompt);
    let b = logits(Some(&dense), &prompt);
    let diff = max_abs_diff(&a, &b);
    eprintln!(
        "low-rank vs dense max abs diff {diff:e}; vs base {:e}",
        max_abs_diff(&a, &base)
    );
    assert!(diff <= 1e-3, "{diff}");
    assert!(
        max_abs_diff(&a, &base) > 0.1,
        "the delta changes the logits"
    );
}

#[test]
fn deltas_are_checked_and_cached() {
    let model = smollm2();
    let mut modules = std::collections::BTreeMap::new();
    modules.insert(
        "model.layers.0.self_attn.nope".to_string(),
        ModuleDelta::Dense(Matrix::zeros(576, 576)),
    );
    let err = model
        .load_delta(&Arc::new(MergedDelta { modules }))
        .unwrap_err();
    assert!(matches!(err, EngineError::UnknownModule { .. }), "{err}");

    let mut modules = std::collections::BTreeMap::new();
    modules.insert(
        "model.layers.0.self_attn.k_proj".to_string(),
        ModuleDelta::Dense(Matrix::zeros(576, 576)),
    );
    let err = model
        .load_delta(&Arc::new(MergedDelta { modules }))
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::DeltaShape {
                expected: (192, 576),
                ..
            }
        ),
        "{err}"
    );

    let shout = Arc::new(
        LoraAdapter::load(&reference("smollm2/adapters/shout"))
            .unwrap()
            .delta(),
    );
    let first = model.load_delta(&shout).unwrap();
    let again = model.load_delta(&shout).unwrap();
    assert!(Arc::ptr_eq(&first, &again), "converted once per Arc");
    assert_eq!(first.modules(), 120);
}
