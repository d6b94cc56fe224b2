//! The `model` grammar of a request, parsed into a typed [`ModelSpec`] before any work:
//!
//! ```text
//! <base-id>                 the base model alone
//! <adapter>                 one adapter
//! <a>+<b>+<c>[@<method>]    merge that set (default method: knots-ties)
//! <a>:0.5+<b>               per-adapter weight
//! bundle:<name>             a configured set with stored method and parameters
//! exp:<name>                an experiment arm, chosen by the server
//! ```
//!
//! Whether a bare name is a base or an adapter is decided later, against what is served.

use crate::adapters::valid_name;
use crate::merge::{MergeOptions, MergeParams, Method};

/// A request's `model`, syntactically valid.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A bare name: a base model or one adapter.
    Name(String),
    /// A set of adapters with weights, and the method if one was named with `@`.
    Set {
        members: Vec<(String, f64)>,
        method: Option<Method>,
    },
    Bundle(String),
    Experiment(String),
}

/// What was wrong with a `model` string or a `merge` field, for a 400 naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field,
        reason: reason.into(),
    }
}

/// The longest `model` string accepted (a set of 64 maximal names with weights fits).
pub const MAX_MODEL_LEN: usize = 16 * 1024;

impl std::str::FromStr for ModelSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.is_empty() {
            return Err(bad("model", "must not be empty"));
        }
        if s.len() > MAX_MODEL_LEN {
            return Err(bad("model", format!("longer than {MAX_MODEL_LEN} bytes")));
        }
        if let Some(name) = s.strip_prefix("bundle:") {
            return checked_name(name).map(|n| Self::Bundle(n.to_string()));
        }
        if let Some(name) = s.strip_prefix("exp:") {
            return checked_name(name).map(|n| Self::Experiment(n.to_string()));
        }
        let (set, method) = match s.rsplit_once('@') {
            Some((set, method)) => {
                let method = method
                    .parse::<Method>()
                    .map_err(|e| bad("model", e.to_string()))?;
                (set, Some(method))
            }
            None => (s, None),
        };
        let members = set
            .split('+')
            .map(parse_member)
            .collect::<Result<Vec<_>, _>>()?;
        match (members.as_slice(), method) {
            ([(name, w)], None) if *w == 1.0 && !set.contains(':') => Ok(Self::Name(name.clone())),
            _ => Ok(Self::Set { members, method }),
        }
    }
}

fn parse_member(part: &str) -> Result<(String, f64), SpecError> {
    let (name, weight) = match part.rsplit_once(':') {
        Some((name, w)) => {
            let weight: f64 = w
                .parse()
                .map_err(|_| bad("model", format!("weight {w:?} of {name:?} is not a number")))?;
            if !(weight.is_finite() && weight.abs() <= MergeParams::MAX_SCALE) {
                return Err(bad(
                    "model",
                    format!(
                        "weight of {name:?} must be finite with |weight| ≤ {}",
                        MergeParams::MAX_SCALE
                    ),
                ));
            }
            (name, weight)
        }
        None => (part, 1.0),
    };
    checked_name(name).map(|n| (n.to_string(), weight))
}

fn checked_name(name: &str) -> Result<&str, SpecError> {
    if valid_name(name) {
        Ok(name)
    } else {
        let shown: String = name
            .chars()
            .take(64)
            .collect::<String>()
            .escape_default()
            .to_string();
        Err(bad(
            "model",
            format!(
                "{shown:?} is not a valid name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, optionally tenant/name)"
            ),
        ))
    }
}

/// The request body's optional `merge` field.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MergeField {
    pub method: Option<String>,
    pub density: Option<f64>,
    pub lambda: Option<f64>,
    pub dare_p: Option<f64>,
    pub seed: Option<u64>,
    pub isotropize: Option<bool>,
    pub common_fraction: Option<f64>,
}

impl MergeField {
    /// The method named here, if any.
    pub fn method(&self) -> Result<Option<Method>, SpecError> {
        self.method
            .as_deref()
            .map(|m| {
                m.parse::<Method>()
                    .map_err(|e| bad("merge.method", e.to_string()))
            })
            .transpose()
    }

    pub fn options(&self) -> MergeOptions {
        MergeOptions {
            lambda: self.lambda,
            density: self.density,
            dare_p: self.dare_p,
            seed: self.seed,
            isotropize: self.isotropize,
            common_fraction: self.common_fraction,
        }
    }

    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn the_grammar() {
        assert_eq!(parse("smollm2").unwrap(), ModelSpec::Name("smollm2".into()));
        assert_eq!(
            parse("acme/sql").unwrap(),
            ModelSpec::Name("acme/sql".into())
        );
        assert_eq!(
            parse("a+b:0.5@ties").unwrap(),
            ModelSpec::Set {
                members: vec![("a".into(), 1.0), ("b".into(), 0.5)],
                method: Some(Method::Ties)
            }
        );
        assert_eq!(
            parse("a@ta").unwrap(),
            ModelSpec::Set {
                members: vec![("a".into(), 1.0)],
                method: Some(Method::Ta)
            }
        );
        assert_eq!(
            parse("a:2").unwrap(),
            ModelSpec::Set {
                members: vec![("a".into(), 2.0)],
                method: None
            }
        );
        assert_eq!(
            parse("bundle:support").unwrap(),
            ModelSpec::Bundle("support".into())
        );
        assert_eq!(
            parse("exp:ab1").unwrap(),
            ModelSpec::Experiment("ab1".into())
        );
    }

    #[test]
    fn bad_strings_name_the_model_field() {
        let long = "a".repeat(20_000);
        for s in [
            "",
            "a+",
            "+a",
            "a@knots",
            "a:x",
            "a:nan",
            "a:inf",
            "a:1e300",
            "../x",
            "a/../b",
            "%2e%2e",
            "a\0b",
            "bundle:",
            "exp:../x",
            "a b",
            long.as_str(),
        ] {
            let err = parse(s).unwrap_err();
            assert_eq!(err.field, "model", "{s:?}");
        }
    }

    #[test]
    fn merge_field_methods_are_checked() {
        let f = MergeField {
            method: Some("nope".into()),
            ..Default::default()
        };
        assert_eq!(f.method().unwrap_err().field, "merge.method");
    }
}
