//! Bundles: named adapter sets with a stored method and parameters, configured at start-up.
//!
//! ```toml
//! [[bundles]]
//! name = "support"                   # requests use model = "bundle:support"
//! model = "billing+returns:0.5@knots-ties"
//! tenant = "acme"                    # optional: visible to this tenant only
//! merge = { density = 0.3, lambda = 0.8 }
//! ```

use serde::Deserialize;

use super::spec::{MergeField, ModelSpec};
use crate::adapters::{Owner, valid_name};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    pub name: String,
    pub model: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub merge: MergeField,
}

/// A validated bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub name: String,
    pub owner: Owner,
    pub spec: ModelSpec,
    pub merge: MergeField,
}

impl Bundle {
    pub fn from_config(c: BundleConfig) -> Result<Self, String> {
        if !valid_name(&c.name) || c.name.contains('/') {
            return Err(format!("bundle name {:?} is not valid", c.name));
        }
        let spec: ModelSpec = c
            .model
            .parse()
            .map_err(|e| format!("bundle {}: {e}", c.name))?;
        if matches!(spec, ModelSpec::Bundle(_) | ModelSpec::Experiment(_)) {
            return Err(format!(
                "bundle {}: model must name adapters, not {}",
                c.name, c.model
            ));
        }
        c.merge
            .method()
            .map_err(|e| format!("bundle {}: {e}", c.name))?;
        let owner = c.tenant.map_or(Owner::Shared, Owner::Tenant);
        Ok(Self {
            name: c.name,
            owner,
            spec,
            merge: c.merge,
        })
    }
}
