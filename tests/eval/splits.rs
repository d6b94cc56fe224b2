//! Split determinism: same seed, same splits; another seed, other splits; no text in two splits;
//! the caps respected.

use std::collections::HashSet;

use knots::eval::split::{Example, split};
use knots::eval::{Caps, Splits, load_task};

fn examples(n: usize, classes: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            text: format!("example text number {i}"),
            label: i % classes,
        })
        .collect()
}

const CAPS: Caps = Caps {
    train: 20,
    val: 5,
    test: 10,
};

fn texts(s: &[Example]) -> HashSet<&str> {
    s.iter().map(|e| e.text.as_str()).collect()
}

#[test]
fn the_same_seed_gives_identical_splits_whatever_the_input_order() {
    let a = split(examples(200, 3), 3, CAPS, 1, "t");
    let mut reversed = examples(200, 3);
    reversed.reverse();
    let b = split(reversed, 3, CAPS, 1, "t");
    assert_eq!(a, b);
}

#[test]
fn another_seed_or_task_draws_other_splits() {
    let a = split(examples(200, 3), 3, CAPS, 1, "t");
    let b = split(examples(200, 3), 3, CAPS, 2, "t");
    let c = split(examples(200, 3), 3, CAPS, 1, "u");
    assert_ne!(texts(&a.test), texts(&b.test));
    assert_ne!(texts(&a.test), texts(&c.test));
}

#[test]
fn splits_are_disjoint_and_capped_per_class() {
    let s = split(examples(200, 3), 3, CAPS, 1, "t");
    let (tr, va, te) = (texts(&s.train), texts(&s.val), texts(&s.test));
    assert!(tr.is_disjoint(&va) && tr.is_disjoint(&te) && va.is_disjoint(&te));
    for class in 0..3 {
        let n = |v: &[Example]| v.iter().filter(|e| e.label == class).count();
        assert_eq!((n(&s.train), n(&s.val), n(&s.test)), (20, 5, 10));
    }
}

#[test]
fn raising_the_train_cap_keeps_the_test_split() {
    // 100 per class: enough for either cap, so nothing is scaled down.
    let small = split(examples(200, 2), 2, CAPS, 3, "t");
    let big = split(examples(200, 2), 2, Caps { train: 40, ..CAPS }, 3, "t");
    assert_eq!(small.test, big.test);
    assert_eq!(small.val, big.val);
    assert!(big.train.len() > small.train.len());
}

fn all_texts(s: &Splits) -> Vec<&str> {
    [&s.train, &s.val, &s.test]
        .into_iter()
        .flatten()
        .map(|e| e.text.as_str())
        .collect()
}

#[test]
fn loaded_tasks_never_repeat_a_text_across_splits() {
    let (suite, cache) = super::suite::mini();
    for task in &suite.tasks {
        let data = load_task(&suite, task, &cache, false).unwrap();
        let all = all_texts(&data.splits);
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), unique.len(), "task {}", task.name);
        let again = load_task(&suite, task, &cache, false).unwrap();
        assert_eq!(data.splits, again.splits);
    }
}

#[test]
fn quick_splits_are_subsets_of_the_full_ones() {
    let (suite, cache) = super::suite::mini();
    for task in &suite.tasks {
        let full = load_task(&suite, task, &cache, false).unwrap().splits;
        let quick = load_task(&suite, task, &cache, true).unwrap().splits;
        for (q, f) in [
            (&quick.train, &full.train),
            (&quick.val, &full.val),
            (&quick.test, &full.test),
        ] {
            assert!(texts(q).is_subset(&texts(f)), "task {}", task.name);
        }
    }
}

#[test]
fn capping_keeps_the_first_examples_of_each_class() {
    let full = split(examples(300, 3), 3, CAPS, 4, "t");
    let small = Caps {
        train: 3,
        val: 2,
        test: 1,
    };
    let quick = knots::eval::split::cap(full.clone(), 3, small);
    assert_eq!(quick.test.len(), 3);
    assert_eq!(quick.val.len(), 6);
    assert_eq!(quick.train.len(), 9);
    let first_of = |s: &[Example], class| s.iter().find(|e| e.label == class).cloned();
    for class in 0..3 {
        assert_eq!(first_of(&quick.train, class), first_of(&full.train, class));
    }
}

/// A prefix of validation or test is a uniform sample of the split: with one class ten times
/// larger than the other, the first examples still hold both classes in the split's proportions
/// (in allocation order they would all be the large class's, whose caps fill with lower hashes).
#[test]
fn a_prefix_of_validation_or_test_samples_every_class() {
    let mut data: Vec<Example> = examples(3300, 1);
    for e in data.iter_mut().skip(3000) {
        e.label = 1;
    }
    let caps = Caps {
        train: 300,
        val: 100,
        test: 200,
    };
    let s = split(data, 2, caps, 0, "imbalanced");
    for (name, split, small) in [("test", &s.test, 100), ("val", &s.val, 50)] {
        let total = split.len();
        let in_split = split.iter().filter(|e| e.label == 1).count();
        let in_prefix = split[..60].iter().filter(|e| e.label == 1).count();
        assert_eq!(
            in_split, small,
            "{name}: the small class's share of the split"
        );
        let expected = 60.0 * in_split as f64 / total as f64;
        assert!(
            (in_prefix as f64 - expected).abs() <= 10.0,
            "{name}: {in_prefix} of the first 60 are the small class, expected about {expected:.0}"
        );
    }
}
