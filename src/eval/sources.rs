//! Readers for the cached source formats (VADER ratings, one-file-per-text folders, BIG-bench
//! JSON tasks, Debian fortune files). Each turns files under the data cache into raw records:
//! an uncleaned text and the source key that decides its class.
//!
//! Step in the data flow: after the suite definition, before cleaning and splitting.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::EvalError;
use super::suite::{SourceDef, TaskDef};

/// One raw labelled text, as the source file holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub text: String,
    pub key: String,
}

/// Reads every record of `task` from the cache at `cache`, in a canonical order.
pub fn read_records(task: &TaskDef, cache: &Path) -> Result<Vec<Record>, EvalError> {
    let keys = || task.classes.iter().flat_map(|c| c.keys.iter());
    match &task.source {
        SourceDef::Vader { files, threshold } => {
            let mut out = Vec::new();
            for file in files {
                out.extend(read_vader(task, &resolve(task, cache, file)?, *threshold)?);
            }
            Ok(out)
        }
        SourceDef::Folders { root } => {
            let root = resolve(task, cache, root)?;
            let mut out = Vec::new();
            for key in keys() {
                out.extend(read_folder(task, &root, key)?);
            }
            Ok(out)
        }
        SourceDef::Bigbench {
            file,
            strip_prefix,
            strip_suffix,
        } => {
            let path = resolve(task, cache, file)?;
            let strip = (strip_prefix.as_deref(), strip_suffix.as_deref());
            read_bigbench(task, &path, strip)
        }
        SourceDef::Fortunes => {
            let mut out = Vec::new();
            for key in keys() {
                out.extend(read_fortunes(task, &resolve(task, cache, key)?, key)?);
            }
            Ok(out)
        }
    }
}

/// Joins a suite-relative path onto the cache, refusing absolute paths and `..`.
fn resolve(task: &TaskDef, cache: &Path, rel: &str) -> Result<PathBuf, EvalError> {
    let path = Path::new(rel);
    if rel.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(EvalError::source(
            &task.name,
            rel,
            "source paths must be relative to the data cache, without `..`",
        ));
    }
    Ok(cache.join(path))
}

fn read_text(task: &TaskDef, path: &Path) -> Result<String, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (run `make data` to fetch the benchmark texts)"
        } else {
            ""
        };
        EvalError::source(&task.name, path, format!("{e}{hint}"))
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn read_vader(task: &TaskDef, path: &Path, threshold: f64) -> Result<Vec<Record>, EvalError> {
    let mut out = Vec::new();
    for (n, line) in read_text(task, path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let (_, rating, text) = (fields.next(), fields.next(), fields.next());
        let (Some(rating), Some(text)) = (rating, text) else {
            let reason = format!(
                "line {}: expected id, rating and text separated by tabs",
                n + 1
            );
            return Err(EvalError::source(&task.name, path, reason));
        };
        let rating: f64 = rating.trim().parse().map_err(|_| {
            let reason = format!("line {}: rating {rating:?} is not a number", n + 1);
            EvalError::source(&task.name, path, reason)
        })?;
        let key = if rating > threshold {
            "positive"
        } else if rating < -threshold {
            "negative"
        } else {
            continue;
        };
        out.push(Record {
            text: text.to_owned(),
            key: key.to_owned(),
        });
    }
    Ok(out)
}

fn read_folder(task: &TaskDef, root: &Path, key: &str) -> Result<Vec<Record>, EvalError> {
    let dir = root.join(key);
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| EvalError::source(&task.name, &dir, format!("{e} (run `make data`)")))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| EvalError::source(&task.name, &dir, e.to_string()))?;
        let path = path.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    files
        .iter()
        .map(|f| {
            Ok(Record {
                text: read_text(task, f)?,
                key: key.to_owned(),
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct BigbenchTask {
    examples: Vec<BigbenchExample>,
}

#[derive(Deserialize)]
struct BigbenchExample {
    input: String,
    target_scores: BTreeMap<String, f64>,
}

fn read_bigbench(
    task: &TaskDef,
    path: &Path,
    (prefix, suffix): (Option<&str>, Option<&str>),
) -> Result<Vec<Record>, EvalError> {
    let text = read_text(task, path)?;
    let parsed: BigbenchTask = serde_json::from_str(&text)
        .map_err(|e| EvalError::source(&task.name, path, format!("not a BIG-bench task: {e}")))?;
    let mut out = Vec::new();
    for example in parsed.examples {
        let Some(key) = best_choice(&example.target_scores) else {
            continue;
        };
        let mut input = example.input.as_str();
        if let Some(p) = prefix {
            input = input.trim_start().strip_prefix(p).unwrap_or(input);
        }
        if let Some(s) = suffix {
            input = input.trim_end().strip_suffix(s.trim_end()).unwrap_or(input);
        }
        out.push(Record {
            text: input.to_owned(),
            key,
        });
    }
    Ok(out)
}

/// The single choice with the highest target score, or `None` on a tie for the best.
fn best_choice(scores: &BTreeMap<String, f64>) -> Option<String> {
    let best = scores.values().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut winners = scores.iter().filter(|(_, v)| **v == best);
    let (key, _) = winners.next()?;
    winners.next().is_none().then(|| key.clone())
}

fn read_fortunes(task: &TaskDef, path: &Path, key: &str) -> Result<Vec<Record>, EvalError> {
    Ok(split_fortunes(&read_text(task, path)?)
        .into_iter()
        .map(|text| Record {
            text,
            key: key.to_owned(),
        })
        .collect())
}

/// Splits a fortune file into its entries (separated by lines holding only `%`).
fn split_fortunes(text: &str) -> Vec<String> {
    let mut entries = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim_end() == "%" {
            entries.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    entries.push(current);
    entries.retain(|e| !e.trim().is_empty());
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortune_files_split_on_percent_lines() {
        let file = "First one.\n%\nSecond\nspans lines.\n%\n%\nThird.";
        assert_eq!(
            split_fortunes(file),
            ["First one.\n", "Second\nspans lines.\n", "Third.\n"]
        );
    }

    #[test]
    fn the_best_choice_must_be_unique() {
        let scores = |pairs: &[(&str, f64)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            best_choice(&scores(&[("a", 0.0), ("b", 1.0)])).as_deref(),
            Some("b")
        );
        assert_eq!(best_choice(&scores(&[("a", 1.0), ("b", 1.0)])), None);
        assert_eq!(best_choice(&scores(&[])), None);
    }
}
