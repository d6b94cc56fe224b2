//! The merge plan: the validated, canonically ordered adapter set and, per target module, which
//! adapters update it. A module an adapter lacks contributes nothing for that adapter.

use std::collections::BTreeMap;

use super::MergeError;
use crate::adapters::{LoraAdapter, LoraModule};

/// One member of the set to merge.
#[derive(Debug, Clone, Copy)]
pub struct MergeInput<'a> {
    pub adapter: &'a LoraAdapter,
    /// The user weight `w_i` (default 1).
    pub weight: f64,
}

impl<'a> MergeInput<'a> {
    pub fn new(adapter: &'a LoraAdapter) -> Self {
        Self {
            adapter,
            weight: 1.0,
        }
    }
}

/// The factors of one adapter in one module, with the adapter's position in the set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Member<'a> {
    pub index: usize,
    pub lora: &'a LoraModule,
}

/// One target module: its path, its `O × I` shape, and the adapters that update it.
#[derive(Debug)]
pub(crate) struct ModulePlan<'a> {
    pub path: &'a str,
    pub shape: (usize, usize),
    pub members: Vec<Member<'a>>,
}

impl ModulePlan<'_> {
    /// The length of this module's representation for TIES: `O·I`, or `k·I` after alignment.
    pub fn dense_len(&self) -> usize {
        self.shape.0 * self.shape.1
    }
}

/// The adapters sorted by name (so results do not depend on the order given) and the modules
/// in path order.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub inputs: Vec<MergeInput<'a>>,
    pub modules: Vec<ModulePlan<'a>>,
}

impl<'a> Plan<'a> {
    pub fn new(inputs: &[MergeInput<'a>]) -> Result<Self, MergeError> {
        if inputs.is_empty() {
            return Err(MergeError::NoAdapters);
        }
        let mut inputs = inputs.to_vec();
        inputs.sort_by(|a, b| a.adapter.name.cmp(&b.adapter.name));
        for pair in inputs.windows(2) {
            if pair[0].adapter.name == pair[1].adapter.name {
                return Err(MergeError::DuplicateAdapter {
                    adapter: pair[0].adapter.name.clone(),
                });
            }
        }
        if let Some(bad) = inputs.iter().find(|i| !i.weight.is_finite()) {
            let reason = format!(
                "weight of {} must be finite, got {}",
                bad.adapter.name, bad.weight
            );
            return Err(MergeError::invalid("weights", reason));
        }
        let modules = group_modules(&inputs)?;
        Ok(Self { inputs, modules })
    }

    pub fn weight(&self, index: usize) -> f64 {
        self.inputs[index].weight
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }
}

fn group_modules<'a>(inputs: &[MergeInput<'a>]) -> Result<Vec<ModulePlan<'a>>, MergeError> {
    let mut by_path: BTreeMap<&'a str, ModulePlan<'a>> = BTreeMap::new();
    for (index, input) in inputs.iter().enumerate() {
        for (path, lora) in &input.adapter.modules {
            let plan = by_path.entry(path.as_str()).or_insert_with(|| ModulePlan {
                path: path.as_str(),
                shape: lora.shape(),
                members: Vec::new(),
            });
            if plan.shape != lora.shape() {
                let first = plan.members[0].index;
                return Err(MergeError::ShapeMismatch {
                    module: path.clone(),
                    adapter: input.adapter.name.clone(),
                    found: lora.shape(),
                    other: inputs[first].adapter.name.clone(),
                    expected: plan.shape,
                });
            }
            plan.members.push(Member { index, lora });
        }
    }
    Ok(by_path.into_values().collect())
}
