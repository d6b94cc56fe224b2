//! Merge methods and their parameters, parsed from user strings and validated before any work.

use std::fmt;
use std::str::FromStr;

use super::MergeError;

/// How a set of adapters is combined (README, "Methods").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// Task arithmetic: `λ·Σ w_i·τ_i`, exact and low-rank.
    Ta,
    /// TIES on the dense updates: trim, elect sign, disjoint mean.
    Ties,
    /// DARE drop-and-rescale, then task arithmetic.
    Dare,
    /// DARE, then TIES (density 1 unless set).
    DareTies,
    /// KnOTS alignment, then task arithmetic (identical to `ta`).
    KnotsTa,
    /// KnOTS alignment, then TIES on the aligned representations.
    KnotsTies,
    /// KnOTS alignment, then DARE and TIES on the aligned representations.
    KnotsDareTies,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Self::Ta,
        Self::Ties,
        Self::Dare,
        Self::DareTies,
        Self::KnotsTa,
        Self::KnotsTies,
        Self::KnotsDareTies,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ta => "ta",
            Self::Ties => "ties",
            Self::Dare => "dare",
            Self::DareTies => "dare-ties",
            Self::KnotsTa => "knots-ta",
            Self::KnotsTies => "knots-ties",
            Self::KnotsDareTies => "knots-dare-ties",
        }
    }

    /// Whether the method drops entries with DARE (and so reads `dare_p` and `seed`).
    pub fn uses_dare(self) -> bool {
        matches!(self, Self::Dare | Self::DareTies | Self::KnotsDareTies)
    }

    /// Whether the method trims and elects signs (and so reads `density`).
    pub fn uses_ties(self) -> bool {
        matches!(
            self,
            Self::Ties | Self::DareTies | Self::KnotsTies | Self::KnotsDareTies
        )
    }

    /// Whether the result is low-rank factors rather than dense matrices.
    pub fn is_low_rank(self) -> bool {
        matches!(
            self,
            Self::Ta | Self::KnotsTa | Self::KnotsTies | Self::KnotsDareTies
        )
    }

    /// The density used when none is given: 0.2 for trimming methods, 1 after DARE.
    pub fn default_density(self) -> f64 {
        match self {
            Self::Ties | Self::KnotsTies => 0.2,
            _ => 1.0,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = MergeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|m| m.as_str()).collect();
                MergeError::invalid(
                    "method",
                    format!("unknown method {s:?}; expected one of {}", names.join(", ")),
                )
            })
    }
}

/// Validated merge parameters. Build with [`MergeParams::new`], which fills each method's
/// defaults and rejects out-of-range values naming the field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeParams {
    pub method: Method,
    /// λ, the scaling coefficient applied to the merged update.
    pub lambda: f64,
    /// Fraction of entries kept per adapter by the TIES trim, in (0, 1].
    pub density: f64,
    /// DARE drop probability, in [0, 1).
    pub dare_p: f64,
    /// DARE seed.
    pub seed: u64,
}

/// Parameters as a user gives them: anything left out takes the method's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MergeOptions {
    pub lambda: Option<f64>,
    pub density: Option<f64>,
    pub dare_p: Option<f64>,
    pub seed: Option<u64>,
}

impl MergeParams {
    pub const DEFAULT_METHOD: Method = Method::KnotsTies;
    pub const DEFAULT_LAMBDA: f64 = 1.0;
    pub const DEFAULT_DARE_P: f64 = 0.1;

    pub fn new(method: Method, options: MergeOptions) -> Result<Self, MergeError> {
        let params = Self {
            method,
            // `+ 0.0` turns `-0.0` into `0.0`, so equal parameters have equal bits.
            lambda: options.lambda.unwrap_or(Self::DEFAULT_LAMBDA) + 0.0,
            density: options.density.unwrap_or(method.default_density()),
            dare_p: options.dare_p.unwrap_or(Self::DEFAULT_DARE_P) + 0.0,
            seed: options.seed.unwrap_or(0),
        };
        params.validate()?;
        Ok(params)
    }

    fn validate(&self) -> Result<(), MergeError> {
        if !self.lambda.is_finite() {
            return Err(MergeError::invalid(
                "lambda",
                format!("must be finite, got {}", self.lambda),
            ));
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(MergeError::invalid(
                "density",
                format!("must be in (0, 1], got {}", self.density),
            ));
        }
        if !(self.dare_p >= 0.0 && self.dare_p < 1.0) {
            return Err(MergeError::invalid(
                "dare_p",
                format!("must be in [0, 1), got {}", self.dare_p),
            ));
        }
        Ok(())
    }
}

impl Default for MergeParams {
    fn default() -> Self {
        Self {
            method: Self::DEFAULT_METHOD,
            lambda: Self::DEFAULT_LAMBDA,
            density: Self::DEFAULT_METHOD.default_density(),
            dare_p: Self::DEFAULT_DARE_P,
            seed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_name_round_trips() {
        for m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>().unwrap(), m);
        }
        let err = "knots".parse::<Method>().unwrap_err();
        assert!(err.to_string().contains("method"), "{err}");
    }

    #[test]
    fn defaults_follow_the_method() {
        let p = MergeParams::new(Method::KnotsTies, MergeOptions::default()).unwrap();
        assert_eq!((p.lambda, p.density, p.dare_p, p.seed), (1.0, 0.2, 0.1, 0));
        let p = MergeParams::new(Method::DareTies, MergeOptions::default()).unwrap();
        assert_eq!(p.density, 1.0);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases = [
            (
                MergeOptions {
                    density: Some(0.0),
                    ..Default::default()
                },
                "density",
            ),
            (
                MergeOptions {
                    density: Some(1.5),
                    ..Default::default()
                },
                "density",
            ),
            (
                MergeOptions {
                    density: Some(f64::NAN),
                    ..Default::default()
                },
                "density",
            ),
            (
                MergeOptions {
                    lambda: Some(f64::INFINITY),
                    ..Default::default()
                },
                "lambda",
            ),
            (
                MergeOptions {
                    dare_p: Some(1.0),
                    ..Default::default()
                },
                "dare_p",
            ),
            (
                MergeOptions {
                    dare_p: Some(-0.1),
                    ..Default::default()
                },
                "dare_p",
            ),
        ];
        for (options, field) in cases {
            match MergeParams::new(Method::Ties, options) {
                Err(MergeError::InvalidParam { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{options:?}: expected an error naming {field}, got {other:?}"),
            }
        }
    }
}
