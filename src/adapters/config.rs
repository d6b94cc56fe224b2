//! `adapter_config.json`: the PEFT LoRA configuration, the options knots supports, and the
//! per-module rank and scale it implies (`rank_pattern`, `alpha_pattern`, rsLoRA).

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `target_modules`: a list of module-name suffixes, or one regular expression that must match
/// the whole module path (PEFT's two forms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// Whether PEFT would wrap the module at `path` (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::List(names) => names
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}"))),
            Self::Regex(pattern) if pattern == "all-linear" => true,
            Self::Regex(pattern) => Regex::new(&format!("^(?:{pattern})$"))
                .map(|re| re.is_match(path))
                .unwrap_or(false),
        }
    }
}

/// The fields of a PEFT LoRA `adapter_config.json` that change what the adapter computes.
/// Fields knots does not read are kept in `other` so they can be reported or round-tripped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Options that change the computation in ways knots does not implement. Each is accepted only
/// at its neutral value (`false`, `null`, `"none"`, empty).
pub const UNSUPPORTED_OPTIONS: &[&str] = &[
    "use_dora",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "monteclora_config",
];

impl AdapterConfig {
    /// The first option that is set to something knots cannot honour, with its value.
    pub fn unsupported_option(&self) -> Option<String> {
        if !self.peft_type.eq_ignore_ascii_case("LORA") {
            return Some(format!(
                "peft_type {:?} (only LORA is supported)",
                self.peft_type
            ));
        }
        if let Some(bias) = self.other.get("bias")
            && bias != &Value::from("none")
        {
            return Some(format!("bias = {bias} (only \"none\" is supported)"));
        }
        UNSUPPORTED_OPTIONS.iter().find_map(|&name| {
            let value = self.other.get(name)?;
            let neutral = match value {
                Value::Null | Value::Bool(false) => true,
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            };
            (!neutral).then(|| format!("{name} = {value}"))
        })
    }

    /// The rank PEFT gives the module at `path`.
    pub fn rank_for(&self, path: &str) -> usize {
        pattern_value(&self.rank_pattern, path).unwrap_or(self.r)
    }

    /// The `lora_alpha` PEFT gives the module at `path`.
    pub fn alpha_for(&self, path: &str) -> f64 {
        pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha)
    }

    /// The LoRA scale of the module at `path`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale_for(&self, path: &str) -> f64 {
        let r = self.rank_for(path) as f64;
        let alpha = self.alpha_for(path);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// PEFT's pattern lookup: a key applies to a module path when the path ends with it as a
/// regular expression, at a `.` boundary (`(.*\.)?(key)$`). The longest matching key wins, so a
/// specific layer overrides a general module name.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns
        .iter()
        .filter(|(key, _)| {
            Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                .map(|re| re.is_match(path))
                .unwrap_or(false)
        })
        .max_by_key(|(key, _)| key.len())
        .map(|(_, &value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> AdapterConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn list_targets_match_at_a_dot_boundary() {
        let t = TargetModules::List(vec!["q_proj".into(), "attention.output.dense".into()]);
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(t.matches("encoder.layer.3.attention.output.dense"));
        assert!(!t.matches("model.layers.0.self_attn.xq_proj"));
        assert!(!t.matches("encoder.layer.3.output.dense"));
    }

    #[test]
    fn regex_targets_match_the_whole_path() {
        let t = TargetModules::Regex(r".*\.(q|v)_proj".into());
        assert!(t.matches("model.layers.0.self_attn.q_proj"));
        assert!(!t.matches("model.layers.0.self_attn.k_proj"));
        assert!(!t.matches("model.layers.0.self_attn.q_proj.extra"));
    }

    #[test]
    fn patterns_override_rank_and_alpha() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],
                "rank_pattern":{"v_proj":4,"layers.1.self_attn.v_proj":2},"alpha_pattern":{"v_proj":4}}"#,
        );
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 8);
        assert_eq!(c.rank_for("model.layers.0.self_attn.v_proj"), 4);
        assert_eq!(c.rank_for("model.layers.1.self_attn.v_proj"), 2);
        assert_eq!(c.scale_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(c.scale_for("model.layers.0.self_attn.v_proj"), 1.0);
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        let c = config(
            r#"{"peft_type":"LORA","r":16,"lora_alpha":8,"target_modules":"all-linear","use_rslora":true}"#,
        );
        assert_eq!(c.scale_for("anything"), 2.0);
    }

    #[test]
    fn unsupported_options_are_named() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q"],"use_dora":true}"#,
        );
        assert_eq!(c.unsupported_option().as_deref(), Some("use_dora = true"));
        let c = config(r#"{"peft_type":"IA3","r":8,"lora_alpha":8,"target_modules":["q"]}"#);
        assert!(c.unsupported_option().unwrap().contains("IA3"));
        let c = config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":8,"target_modules":["q"],"use_dora":false,"bias":"none","layer_replication":null}"#,
        );
        assert_eq!(c.unsupported_option(), None);
    }
}
