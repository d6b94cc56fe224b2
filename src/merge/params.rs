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
    /// Core Space: task arithmetic on the core matrices (identical to `ta` unless isotropized).
    CoreTa,
    /// Core Space: TIES on each module's core matrices (trim per module).
    CoreTies,
    /// Core Space: DARE, then TIES on the core matrices.
    CoreDareTies,
    /// Core Space: TSV-M, each adapter's top singular triplets side by side, orthogonalized.
    CoreTsv,
    /// Core Space: Iso-C, task arithmetic with a flattened spectrum.
    CoreIsoC,
    /// Core Space: Iso-CTS, a common subspace plus equal task-specific ones, flat spectrum.
    CoreIsoCts,
}

impl Method {
    pub const ALL: [Method; 13] = [
        Self::Ta,
        Self::Ties,
        Self::Dare,
        Self::DareTies,
        Self::KnotsTa,
        Self::KnotsTies,
        Self::KnotsDareTies,
        Self::CoreTa,
        Self::CoreTies,
        Self::CoreDareTies,
        Self::CoreTsv,
        Self::CoreIsoC,
        Self::CoreIsoCts,
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
            Self::CoreTa => "core-ta",
            Self::CoreTies => "core-ties",
            Self::CoreDareTies => "core-dare-ties",
            Self::CoreTsv => "core-tsv",
            Self::CoreIsoC => "core-iso-c",
            Self::CoreIsoCts => "core-iso-cts",
        }
    }

    /// Whether the method drops entries with DARE (and so reads `dare_p` and `seed`).
    pub fn uses_dare(self) -> bool {
        matches!(
            self,
            Self::Dare | Self::DareTies | Self::KnotsDareTies | Self::CoreDareTies
        )
    }

    /// Whether the method trims and elects signs (and so reads `density`).
    pub fn uses_ties(self) -> bool {
        matches!(
            self,
            Self::Ties
                | Self::DareTies
                | Self::KnotsTies
                | Self::KnotsDareTies
                | Self::CoreTies
                | Self::CoreDareTies
        )
    }

    /// Whether the result is low-rank factors rather than dense matrices.
    pub fn is_low_rank(self) -> bool {
        !matches!(self, Self::Ties | Self::Dare | Self::DareTies)
    }

    /// Whether the method merges in Core Space (and so reads `isotropize`).
    pub fn is_core(self) -> bool {
        matches!(
            self,
            Self::CoreTa
                | Self::CoreTies
                | Self::CoreDareTies
                | Self::CoreTsv
                | Self::CoreIsoC
                | Self::CoreIsoCts
        )
    }

    /// Whether the method always flattens the merged spectrum (Iso-C and Iso-CTS).
    pub fn always_isotropic(self) -> bool {
        matches!(self, Self::CoreIsoC | Self::CoreIsoCts)
    }

    /// The density used when none is given: 0.2 for trimming methods, 1 after DARE.
    pub fn default_density(self) -> f64 {
        match self {
            Self::Ties | Self::KnotsTies | Self::CoreTies => 0.2,
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
    /// Flatten the merged core matrix's spectrum (Core Space methods).
    pub isotropize: bool,
    /// Iso-CTS: the fraction of the core dimension given to the common subspace, in [0, 1].
    pub common_fraction: f64,
}

/// Parameters as a user gives them: anything left out takes the method's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MergeOptions {
    pub lambda: Option<f64>,
    pub density: Option<f64>,
    pub dare_p: Option<f64>,
    pub seed: Option<u64>,
    pub isotropize: Option<bool>,
    pub common_fraction: Option<f64>,
}

impl MergeParams {
    pub const DEFAULT_METHOD: Method = Method::KnotsTies;
    pub const DEFAULT_LAMBDA: f64 = 1.0;
    pub const DEFAULT_DARE_P: f64 = 0.1;
    /// Iso-CTS' common-space fraction, as in its paper.
    pub const DEFAULT_COMMON_FRACTION: f64 = 0.8;

    pub fn new(method: Method, options: MergeOptions) -> Result<Self, MergeError> {
        let params = Self {
            method,
            // `+ 0.0` turns `-0.0` into `0.0`, so equal parameters have equal bits.
            lambda: options.lambda.unwrap_or(Self::DEFAULT_LAMBDA) + 0.0,
            density: options.density.unwrap_or(method.default_density()),
            dare_p: options.dare_p.unwrap_or(Self::DEFAULT_DARE_P) + 0.0,
            seed: options.seed.unwrap_or(0),
            isotropize: isotropize(method, options.isotropize)?,
            common_fraction: options
                .common_fraction
                .unwrap_or(Self::DEFAULT_COMMON_FRACTION)
                + 0.0,
        };
        params.validate()?;
        Ok(params)
    }

    /// The largest |λ| and |adapter weight| accepted: far beyond any useful scale, and small
    /// enough that a scaled f32 update stays finite.
    pub const MAX_SCALE: f64 = 1e4;

    fn validate(&self) -> Result<(), MergeError> {
        if !(0.0..=1.0).contains(&self.common_fraction) {
            return Err(MergeError::invalid(
                "common_fraction",
                format!("must be in [0, 1], got {}", self.common_fraction),
            ));
        }
        if !(self.lambda.is_finite() && self.lambda.abs() <= Self::MAX_SCALE) {
            return Err(MergeError::invalid(
                "lambda",
                format!(
                    "must be finite with |lambda| ≤ {}, got {}",
                    Self::MAX_SCALE,
                    self.lambda
                ),
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

/// The `isotropize` setting of `method`: off unless asked for, always on for Iso-C and Iso-CTS,
/// and only meaningful in Core Space.
fn isotropize(method: Method, asked: Option<bool>) -> Result<bool, MergeError> {
    match asked {
        Some(true) if !method.is_core() => Err(MergeError::invalid(
            "isotropize",
            format!("applies to the core-* methods only, not {method}"),
        )),
        Some(false) if method.always_isotropic() => Err(MergeError::invalid(
            "isotropize",
            format!("{method} always flattens the spectrum; use core-ta or core-tsv without it"),
        )),
        _ => Ok(asked.unwrap_or(false) || method.always_isotropic()),
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
            isotropize: false,
            common_fraction: Self::DEFAULT_COMMON_FRACTION,
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
        let p = MergeParams::new(Method::CoreIsoCts, MergeOptions::default()).unwrap();
        assert_eq!((p.isotropize, p.common_fraction), (true, 0.8));
        let p = MergeParams::new(Method::CoreTsv, MergeOptions::default()).unwrap();
        assert!(!p.isotropize);
    }

    #[test]
    fn isotropize_is_for_core_methods() {
        let on = MergeOptions {
            isotropize: Some(true),
            ..Default::default()
        };
        assert!(MergeParams::new(Method::CoreTies, on).unwrap().isotropize);
        for (method, asked) in [(Method::KnotsTies, true), (Method::CoreIsoC, false)] {
            let options = MergeOptions {
                isotropize: Some(asked),
                ..Default::default()
            };
            match MergeParams::new(method, options) {
                Err(MergeError::InvalidParam { field, .. }) => assert_eq!(field, "isotropize"),
                other => panic!("{method} isotropize {asked}: {other:?}"),
            }
        }
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
            (
                MergeOptions {
                    common_fraction: Some(1.5),
                    ..Default::default()
                },
                "common_fraction",
            ),
            (
                MergeOptions {
                    common_fraction: Some(f64::NAN),
                    ..Default::default()
                },
                "common_fraction",
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
