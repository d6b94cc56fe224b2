//! The `model` grammar (`ModelSpec`), the `merge` field checked with it (`ModelRequest::parse`),
//! method names, merge parameters, merge keys and configured bundles.

use knots::adapters::{AdapterDigest, valid_name};
use knots::merge::{MergeError, MergeKey, MergeOptions, MergeParams, Method};
use knots::server::bundles::{Bundle, BundleConfig};
use knots::server::call::ModelRequest;
use knots::server::error::ApiError;
use knots::server::spec::{MAX_MODEL_LEN, MergeField, ModelSpec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

use super::strategies::{Gen, method_text, model_string, special_f64};
use super::{Tally, fuzz};

/// A `merge` field with edge values (as the server deserializes it).
fn merge_field() -> Gen<Option<MergeField>> {
    let f = || prop::option::weighted(0.3, special_f64());
    prop::option::weighted(
        0.5,
        (
            prop::option::weighted(0.4, method_text()),
            f(),
            f(),
            f(),
            f(),
            prop::option::weighted(0.2, any::<u64>()),
            prop::option::weighted(0.2, any::<bool>()),
        )
            .prop_map(
                |(method, density, lambda, dare_p, common_fraction, seed, isotropize)| MergeField {
                    method,
                    density,
                    lambda,
                    dare_p,
                    seed,
                    isotropize,
                    common_fraction,
                },
            ),
    )
    .boxed()
}

/// `spec` written back in the grammar, weights explicit for sets (but for a first member named
/// `bundle` or `exp`, which would read as a prefix with one; such a member always weighs 1).
fn render(spec: &ModelSpec) -> String {
    match spec {
        ModelSpec::Name(n) => n.clone(),
        ModelSpec::Bundle(n) => format!("bundle:{n}"),
        ModelSpec::Experiment(n) => format!("exp:{n}"),
        ModelSpec::Set { members, method } => {
            let set: Vec<String> = members
                .iter()
                .enumerate()
                .map(|(i, (n, w))| match (i, n.as_str()) {
                    (0, "bundle" | "exp") => n.clone(),
                    _ => format!("{n}:{w}"),
                })
                .collect();
            match method {
                Some(m) => format!("{}@{m}", set.join("+")),
                None => set.join("+"),
            }
        }
    }
}

const MERGE_FIELDS: &[&str] = &[
    "method",
    "density",
    "lambda",
    "dare_p",
    "seed",
    "isotropize",
    "common_fraction",
    "weights",
];

fn check_params(
    method: Method,
    options: MergeOptions,
) -> Result<Option<MergeParams>, TestCaseError> {
    match MergeParams::new(method, options) {
        Ok(p) => {
            prop_assert!(p.density > 0.0 && p.density <= 1.0, "{p:?}");
            prop_assert!(p.dare_p >= 0.0 && p.dare_p < 1.0, "{p:?}");
            prop_assert!(p.lambda.is_finite(), "{p:?}");
            prop_assert!((0.0..=1.0).contains(&p.common_fraction), "{p:?}");
            prop_assert!(!p.isotropize || method.is_core(), "{p:?}");
            Ok(Some(p))
        }
        Err(MergeError::InvalidParam { field, .. }) => {
            prop_assert!(MERGE_FIELDS.contains(&field), "unknown field {field}");
            Ok(None)
        }
        Err(other) => Err(TestCaseError::fail(format!("unexpected {other:?}"))),
    }
}

fn case(
    tally: &Tally,
    (model, merge, method): (String, Option<MergeField>, String),
) -> TestCaseResult {
    // The grammar alone.
    let parsed = model.parse::<ModelSpec>();
    tally.add(match &parsed {
        Err(_) => "refused",
        Ok(ModelSpec::Name(_)) => "name",
        Ok(ModelSpec::Set { .. }) => "set",
        Ok(ModelSpec::Bundle(_)) => "bundle",
        Ok(ModelSpec::Experiment(_)) => "experiment",
    });
    match &parsed {
        Err(e) => {
            prop_assert_eq!(e.field, "model");
            prop_assert!(e.to_string().starts_with("invalid model: "), "{e}");
        }
        Ok(spec) => {
            prop_assert!(model.len() <= MAX_MODEL_LEN);
            match spec {
                ModelSpec::Name(n) => {
                    prop_assert!(valid_name(n) && n == &model, "{spec:?}");
                }
                ModelSpec::Bundle(n) | ModelSpec::Experiment(n) => {
                    prop_assert!(valid_name(n), "{spec:?}");
                    prop_assert_eq!(render(spec), model.clone());
                }
                ModelSpec::Set { members, .. } => {
                    prop_assert!(!members.is_empty());
                    for (n, w) in members {
                        prop_assert!(valid_name(n) && w.is_finite(), "{spec:?}");
                    }
                }
            }
            // Written back with explicit weights, the spec parses to itself (unless the weights
            // make it longer than the limit).
            let rendered = render(spec);
            if rendered.len() <= MAX_MODEL_LEN {
                let again = rendered.parse::<ModelSpec>();
                prop_assert_eq!(
                    again.as_ref(),
                    Ok(spec),
                    "{:?} did not round-trip",
                    rendered
                );
            }
        }
    }

    // Method names.
    match method.parse::<Method>() {
        Ok(m) => prop_assert_eq!(m.as_str(), method.as_str()),
        Err(e) => {
            prop_assert!(!Method::ALL.iter().any(|m| m.as_str() == method));
            let named = matches!(
                e,
                MergeError::InvalidParam {
                    field: "method",
                    ..
                }
            );
            prop_assert!(named, "{e:?}");
        }
    }

    // `model` and `merge` together, as every route parses them.
    match ModelRequest::parse(&model, merge.clone()) {
        Ok(req) => {
            tally.add("request valid");
            prop_assert_eq!(Ok(&req.spec), parsed.as_ref());
            let m = req.method();
            prop_assert!(m.is_ok(), "{m:?}");
            if !req.merge.is_empty() {
                let checked = check_params(m.unwrap(), req.merge.options())?;
                prop_assert!(checked.is_some());
            }
        }
        Err(ApiError::BadRequest { param: Some(p), .. }) => {
            prop_assert!(p == "model" || p.starts_with("merge."), "param {p}");
            if parsed.is_err() {
                prop_assert_eq!(p, "model");
            }
        }
        Err(other) => return Err(TestCaseError::fail(format!("not a 400: {other:?}"))),
    }

    // Parameters of every method, and the cache key of a parsed set.
    let options = merge.as_ref().map(MergeField::options).unwrap_or_default();
    let m = Method::ALL[model.len() % Method::ALL.len()];
    if let (Some(params), Ok(ModelSpec::Set { members, .. })) = (check_params(m, options)?, &parsed)
    {
        let key = |order: &mut dyn Iterator<Item = &(String, f64)>| {
            MergeKey::new(
                "gen",
                order.map(|(n, w)| (n.clone(), AdapterDigest([n.len() as u8; 32]), *w)),
                &params,
            )
        };
        match (key(&mut members.iter()), key(&mut members.iter().rev())) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a.id(), b.id());
                prop_assert_eq!(a.id().len(), 12);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
            (a, b) => return Err(TestCaseError::fail(format!("order changed {a:?} / {b:?}"))),
        }
    }

    // A bundle configured with this model.
    let bundle = Bundle::from_config(BundleConfig {
        name: "b".into(),
        model: model.clone(),
        tenant: None,
        merge: merge.unwrap_or_default(),
    });
    if let Ok(b) = bundle {
        let set = matches!(b.spec, ModelSpec::Name(_) | ModelSpec::Set { .. });
        prop_assert!(set, "{:?}", b.spec);
    }
    Ok(())
}

#[test]
fn model_strings() {
    let tally = Tally::default();
    fuzz(
        "model_string",
        20_000,
        1,
        (model_string(), merge_field(), method_text()),
        |input| case(&tally, input),
    );
    tally.print("model_string");
}
