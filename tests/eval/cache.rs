//! The real suite on the fetched data (`make data`; `make test` runs it first). Skipped, with a
//! printed note, only when the cache is absent.

use std::path::PathBuf;

use knots::eval::{Suite, load_suite};

pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_suite_file_is_valid_and_has_at_least_six_tasks() {
    let suite = Suite::load(&repo("data/suite.toml")).unwrap();
    assert!(suite.tasks.len() >= 6, "{} tasks", suite.tasks.len());
}

#[test]
fn every_fetched_task_has_classes_and_non_empty_splits() {
    let cache = repo("data/cache");
    if !cache.join(".stamps").is_dir() {
        eprintln!("note: data/cache is absent; run `make data` to check the real suite");
        return;
    }
    let suite = Suite::load(&repo("data/suite.toml")).unwrap();
    for quick in [true, false] {
        let tasks = load_suite(&suite, &cache, quick).unwrap();
        for task in &tasks {
            assert!(task.classes.len() >= 2, "task {}", task.name);
            for class in 0..task.classes.len() {
                let (tr, va, te) = task.class_counts(class);
                assert!(
                    tr > 0 && va > 0 && te > 0,
                    "task {} class {class}",
                    task.name
                );
            }
            let caps = suite.caps(quick);
            let s = &task.splits;
            assert!(s.test.len() <= caps.test * task.classes.len());
            assert!(s.train.len() <= caps.train * task.classes.len());
        }
    }
}
