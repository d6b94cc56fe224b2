//! Fixed, seeded train/validation/test splits.
//!
//! Each example's place is decided by a hash of (seed, task, text) alone: SHA-256, so the splits
//! are identical across runs, machines and platforms and do not depend on the order the sources
//! list their records. Per class, examples are ordered by that hash; the test split takes the
//! first ones, validation the next, training the rest up to the caps. So while a class has enough
//! examples for all its caps, raising the training cap never moves an example out of the test
//! split. A class with fewer examples has its caps scaled down in proportion ([`allocate`]).
//! Validation and test are then ordered by a second, independent hash, so the first N examples
//! of either (what a benchmark with a per-task budget reads) are a uniform sample of it; training
//! stays in allocation order (training draws seeded samples of it). Texts are deduplicated before
//! splitting, so no text appears in two splits (a text seen with two different classes is
//! dropped as ambiguous).
//!
//! Step in the data flow: after cleaning, before training and evaluation.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::suite::Caps;

pub use crate::labels::Example;

/// The three splits of one task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Splits {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub test: Vec<Example>,
}

/// Removes repeated texts: the first copy is kept when every copy has the same label; a text
/// seen with two labels is dropped entirely. Returns the kept examples (in input order) and the
/// number of ambiguous texts dropped.
pub fn dedup(examples: Vec<Example>) -> (Vec<Example>, usize) {
    let mut labels: HashMap<&str, Option<usize>> = HashMap::new();
    for e in &examples {
        labels
            .entry(e.text.as_str())
            .and_modify(|l| {
                if *l != Some(e.label) {
                    *l = None;
                }
            })
            .or_insert(Some(e.label));
    }
    let ambiguous = labels.values().filter(|l| l.is_none()).count();
    let keep: HashMap<String, usize> = labels
        .into_iter()
        .filter_map(|(t, l)| l.map(|l| (t.to_owned(), l)))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let kept = examples
        .into_iter()
        .filter(|e| keep.contains_key(&e.text) && seen.insert(e.text.clone()))
        .collect();
    (kept, ambiguous)
}

/// Splits deduplicated `examples` of a task with `n_classes` classes under per-class `caps`.
pub fn split(
    examples: Vec<Example>,
    n_classes: usize,
    caps: Caps,
    seed: u64,
    task: &str,
) -> Splits {
    let mut by_class: Vec<Vec<(u64, Example)>> = vec![Vec::new(); n_classes];
    for e in examples {
        if let Some(class) = by_class.get_mut(e.label) {
            class.push((split_hash(seed, task, &e.text), e));
        }
    }
    let mut splits: [Vec<(u64, Example)>; 3] = Default::default();
    for mut class in by_class {
        class.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.text.cmp(&b.1.text)));
        let (train, val, test) = allocate(class.len(), caps);
        let mut rest = class.into_iter();
        splits[2].extend(rest.by_ref().take(test));
        splits[1].extend(rest.by_ref().take(val));
        splits[0].extend(rest.take(train));
    }
    let [train, val, test] = splits;
    let by_hash = |mut s: Vec<(u64, Example)>| {
        s.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.text.cmp(&b.1.text)));
        s.into_iter().map(|(_, e)| e).collect::<Vec<_>>()
    };
    // A class with many examples fills its caps with lower hashes than a small class, so in the
    // allocation hash's order a prefix of validation or test would be mostly the largest class.
    let shuffled = |s: Vec<(u64, Example)>| {
        let order = order_hash(seed, task);
        by_hash(s.into_iter().map(|(_, e)| (order(&e.text), e)).collect())
    };
    Splits {
        train: by_hash(train),
        val: shuffled(val),
        test: shuffled(test),
    }
}

/// Keeps at most `caps` examples per class in each split (the first ones in the split's
/// order). A `--quick` run caps the full splits this way, so its splits are subsets of the full
/// run's: nothing a quick run trains on is in a full run's test split.
pub fn cap(splits: Splits, n_classes: usize, caps: Caps) -> Splits {
    let take = |split: Vec<Example>, max: usize| {
        let mut seen = vec![0usize; n_classes];
        let keep = |e: &Example| match seen.get_mut(e.label) {
            Some(n) if *n < max => {
                *n += 1;
                true
            }
            _ => false,
        };
        split.into_iter().filter(keep).collect()
    };
    Splits {
        train: take(splits.train, caps.train),
        val: take(splits.val, caps.val),
        test: take(splits.test, caps.test),
    }
}

/// How many of a class's `n` examples go to (train, val, test): the caps when there are enough,
/// otherwise the caps scaled down in proportion (each split keeps at least one example when
/// `n >= 3`).
pub fn allocate(n: usize, caps: Caps) -> (usize, usize, usize) {
    let total = caps.train + caps.val + caps.test;
    if n >= total {
        return (caps.train, caps.val, caps.test);
    }
    let mut test = n * caps.test / total;
    let mut val = n * caps.val / total;
    if n >= 3 {
        test = test.max(1);
        val = val.max(1);
    }
    let test = test.min(n);
    let val = val.min(n - test);
    (n - test - val, val, test)
}

/// The order of the validation and test splits: a second hash, independent of the one that
/// allocated the examples, so every prefix of a split is a uniform sample of it (classes in the
/// split's proportions).
fn order_hash<'a>(seed: u64, task: &'a str) -> impl Fn(&str) -> u64 + 'a {
    move |text| split_hash(seed, &format!("{task}\u{0}order"), text)
}

/// The position of a text in its class's order: the first 8 bytes of
/// SHA-256(seed as little-endian u64 ‖ task ‖ 0 ‖ text), read as a big-endian u64.
pub fn split_hash(seed: u64, task: &str, text: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(task.as_bytes());
    h.update([0u8]);
    h.update(text.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_scales_down_and_keeps_every_split() {
        let caps = Caps {
            train: 6,
            val: 2,
            test: 4,
        };
        assert_eq!(allocate(100, caps), (6, 2, 4));
        assert_eq!(allocate(12, caps), (6, 2, 4));
        assert_eq!(allocate(6, caps), (3, 1, 2));
        assert_eq!(allocate(3, caps), (1, 1, 1));
        assert_eq!(allocate(1, caps), (1, 0, 0));
        assert_eq!(allocate(0, caps), (0, 0, 0));
    }

    #[test]
    fn the_hash_is_pinned() {
        // Pinned so a change to the split function cannot go unnoticed: it would silently move
        // examples between splits and invalidate trained adapters' test accuracies.
        assert_eq!(split_hash(0, "t", "x"), 0x133c_e3b8_3360_9a4d);
        assert_ne!(split_hash(0, "t", "x"), split_hash(1, "t", "x"));
        assert_ne!(split_hash(0, "t", "x"), split_hash(0, "u", "x"));
        assert_ne!(split_hash(0, "ta", "x"), split_hash(0, "t", "ax"));
    }

    #[test]
    fn dedup_drops_ambiguous_texts_and_repeats() {
        let ex = |t: &str, l| Example {
            text: t.into(),
            label: l,
        };
        let (kept, ambiguous) = dedup(vec![
            ex("a", 0),
            ex("b", 1),
            ex("a", 0),
            ex("c", 0),
            ex("c", 1),
        ]);
        assert_eq!(kept, vec![ex("a", 0), ex("b", 1)]);
        assert_eq!(ambiguous, 1);
    }
}
