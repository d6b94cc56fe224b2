//! `MergeKey`: the canonical identity of a merge, used as the cache key. Adapters are sorted by
//! name and carry their content digests; floats are validated, `-0.0` is folded into `0.0`, and
//! Hash and Eq both work on the same normalised bits. Parameters a method does not read are
//! dropped, and methods that compute the same result share one name (`knots-ta` and `core-ta`
//! key as `ta`, `core-iso-c` as `core-ta` isotropized), so equal merges share one entry.

use std::fmt;

use sha2::{Digest, Sha256};

use super::{MergeError, MergeParams, Method};
use crate::adapters::AdapterDigest;

/// One member of a keyed set: adapter name, content digest, weight bits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyMember {
    pub name: String,
    pub digest: AdapterDigest,
    weight_bits: u64,
}

impl KeyMember {
    pub fn weight(&self) -> f64 {
        f64::from_bits(self.weight_bits)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MergeKey {
    pub base: String,
    pub members: Vec<KeyMember>,
    pub method: Method,
    pub isotropize: bool,
    params_bits: [u64; 5],
}

fn bits(x: f64) -> u64 {
    (x + 0.0).to_bits()
}

impl MergeKey {
    /// Builds the key of merging `members` (name, digest, weight) on `base` with `params`.
    pub fn new(
        base: &str,
        members: impl IntoIterator<Item = (String, AdapterDigest, f64)>,
        params: &MergeParams,
    ) -> Result<Self, MergeError> {
        let mut members: Vec<KeyMember> = members
            .into_iter()
            .map(|(name, digest, weight)| {
                if weight.is_finite() {
                    Ok(KeyMember {
                        name,
                        digest,
                        weight_bits: bits(weight),
                    })
                } else {
                    Err(MergeError::invalid(
                        "weights",
                        format!("weight of {name} must be finite, got {weight}"),
                    ))
                }
            })
            .collect::<Result<_, _>>()?;
        if members.is_empty() {
            return Err(MergeError::NoAdapters);
        }
        members.sort();
        if let Some(pair) = members.windows(2).find(|p| p[0].name == p[1].name) {
            return Err(MergeError::DuplicateAdapter {
                adapter: pair[0].name.clone(),
            });
        }
        let method = match params.method {
            Method::KnotsTa => Method::Ta,
            Method::CoreTa if !params.isotropize => Method::Ta,
            Method::CoreIsoC => Method::CoreTa,
            other => other,
        };
        let common_fraction = if method == Method::CoreIsoCts {
            params.common_fraction
        } else {
            0.0
        };
        let density = if method.uses_ties() {
            params.density
        } else {
            1.0
        };
        let (dare_p, seed) = if method.uses_dare() {
            (params.dare_p, params.seed)
        } else {
            (0.0, 0)
        };
        Ok(Self {
            base: base.to_string(),
            members,
            method,
            isotropize: params.isotropize,
            params_bits: [
                bits(params.lambda),
                bits(density),
                bits(dare_p),
                seed,
                bits(common_fraction),
            ],
        })
    }

    pub fn lambda(&self) -> f64 {
        f64::from_bits(self.params_bits[0])
    }

    pub fn density(&self) -> f64 {
        f64::from_bits(self.params_bits[1])
    }

    pub fn dare_p(&self) -> f64 {
        f64::from_bits(self.params_bits[2])
    }

    pub fn seed(&self) -> u64 {
        self.params_bits[3]
    }

    pub fn common_fraction(&self) -> f64 {
        f64::from_bits(self.params_bits[4])
    }

    /// A short stable identifier: the first 12 hex digits of SHA-256 over the canonical form.
    pub fn id(&self) -> String {
        let digest = Sha256::digest(self.to_string().as_bytes());
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    /// The canonical form with full adapter digests: what a content-addressed store hashes, so
    /// two keys share an address only when every input and parameter is the same.
    pub fn canonical(&self) -> String {
        self.render(usize::MAX)
    }

    /// Whether the adapter `name` takes part in this merge.
    pub fn contains(&self, name: &str) -> bool {
        self.members.iter().any(|m| m.name == name)
    }
}

impl fmt::Display for MergeKey {
    /// `base|a:w@digest+b:w@digest|method|lambda,density,dare_p,seed`, with 12 digest digits,
    /// then `,isotropize` and `,common_fraction` where the method reads them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(12))
    }
}

impl MergeKey {
    /// The canonical form with the first `digits` hex digits of each adapter digest.
    fn render(&self, digits: usize) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                let digest = m.digest.to_string();
                let shown = &digest[..digits.min(digest.len())];
                format!("{}:{}@{shown}", m.name, m.weight())
            })
            .collect();
        let mut out = format!(
            "{}|{}|{}|{},{},{},{}",
            self.base,
            members.join("+"),
            self.method,
            self.lambda(),
            self.density(),
            self.dare_p(),
            self.seed()
        );
        if self.isotropize {
            out.push_str(",isotropize");
        }
        if self.method == Method::CoreIsoCts {
            out.push_str(&format!(",{}", self.common_fraction()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::MergeOptions;

    fn key(members: &[(&str, f64)], method: Method, options: MergeOptions) -> MergeKey {
        let params = MergeParams::new(method, options).unwrap();
        let members = members
            .iter()
            .map(|&(n, w)| (n.to_string(), AdapterDigest([n.len() as u8; 32]), w));
        MergeKey::new("base", members, &params).unwrap()
    }

    #[test]
    fn order_negative_zero_and_unused_parameters_do_not_matter() {
        let a = key(
            &[("x", 1.0), ("yy", 0.0)],
            Method::Ta,
            MergeOptions {
                density: Some(0.3),
                ..Default::default()
            },
        );
        let b = key(
            &[("yy", -0.0), ("x", 1.0)],
            Method::KnotsTa,
            MergeOptions::default(),
        );
        assert_eq!(a, b);
        assert_eq!(a.id(), b.id());
        let c = key(
            &[("x", 1.0), ("yy", 0.5)],
            Method::Ta,
            MergeOptions::default(),
        );
        assert_ne!(a, c);
    }

    #[test]
    fn core_methods_with_the_same_result_share_a_key() {
        let iso = MergeOptions {
            isotropize: Some(true),
            ..Default::default()
        };
        let plain = key(&[("x", 1.0)], Method::CoreTa, MergeOptions::default());
        assert_eq!(
            plain,
            key(&[("x", 1.0)], Method::Ta, MergeOptions::default())
        );
        let iso_c = key(&[("x", 1.0)], Method::CoreIsoC, MergeOptions::default());
        assert_eq!(iso_c, key(&[("x", 1.0)], Method::CoreTa, iso));
        assert_ne!(iso_c, plain);
        let with_fraction = |method, f| {
            let options = MergeOptions {
                common_fraction: Some(f),
                ..Default::default()
            };
            key(&[("x", 1.0)], method, options)
        };
        let cts = |f| with_fraction(Method::CoreIsoCts, f);
        assert_ne!(cts(0.5), cts(0.8));
        assert!(cts(0.5).to_string().ends_with(",isotropize,0.5"));
        // TSV-M does not read the common fraction.
        assert_eq!(
            with_fraction(Method::CoreTsv, 0.5),
            with_fraction(Method::CoreTsv, 0.8)
        );
    }

    #[test]
    fn parameters_a_method_reads_are_part_of_the_key() {
        let d2 = key(
            &[("x", 1.0)],
            Method::Ties,
            MergeOptions {
                density: Some(0.2),
                ..Default::default()
            },
        );
        let d3 = key(
            &[("x", 1.0)],
            Method::Ties,
            MergeOptions {
                density: Some(0.3),
                ..Default::default()
            },
        );
        assert_ne!(d2, d3);
        let s1 = key(
            &[("x", 1.0)],
            Method::Dare,
            MergeOptions {
                seed: Some(1),
                ..Default::default()
            },
        );
        let s2 = key(
            &[("x", 1.0)],
            Method::Dare,
            MergeOptions {
                seed: Some(2),
                ..Default::default()
            },
        );
        assert_ne!(s1, s2);
    }

    #[test]
    fn a_changed_digest_is_a_different_key() {
        let params = MergeParams::default();
        let one = MergeKey::new(
            "b",
            [("x".to_string(), AdapterDigest([1; 32]), 1.0)],
            &params,
        )
        .unwrap();
        let two = MergeKey::new(
            "b",
            [("x".to_string(), AdapterDigest([2; 32]), 1.0)],
            &params,
        )
        .unwrap();
        assert_ne!(one, two);
    }

    #[test]
    fn duplicates_and_bad_weights_are_rejected() {
        let params = MergeParams::default();
        let d = AdapterDigest([0; 32]);
        let dup = MergeKey::new(
            "b",
            [("x".to_string(), d, 1.0), ("x".to_string(), d, 2.0)],
            &params,
        );
        assert!(matches!(dup, Err(MergeError::DuplicateAdapter { .. })));
        let nan = MergeKey::new("b", [("x".to_string(), d, f64::NAN)], &params);
        assert!(matches!(
            nan,
            Err(MergeError::InvalidParam {
                field: "weights",
                ..
            })
        ));
    }
}
