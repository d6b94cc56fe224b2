//! The suite file and every source format, on the invented snippets in `fixtures/eval-mini`.

use std::path::Path;

use knots::eval::{EvalError, Suite, load_task};

use crate::common::fixture;

pub fn mini() -> (Suite, std::path::PathBuf) {
    let dir = fixture("eval-mini");
    let suite = Suite::load(&dir.join("suite.toml")).unwrap();
    (suite, dir.join("cache"))
}

fn texts(suite: &Suite, cache: &Path, task: &str) -> Vec<(String, usize)> {
    let data = load_task(suite, suite.task(task).unwrap(), cache, false).unwrap();
    let s = &data.splits;
    let mut all: Vec<_> = [&s.train, &s.val, &s.test]
        .into_iter()
        .flatten()
        .map(|e| (e.text.clone(), e.label))
        .collect();
    all.sort();
    all
}

#[test]
fn vader_ratings_split_by_sign_and_drop_near_zero_and_ambiguous_texts() {
    let (suite, cache) = mini();
    let data = load_task(&suite, suite.task("polarity").unwrap(), &cache, false).unwrap();
    assert_eq!(
        data.dropped_ambiguous, 1,
        "'Loved every minute' is rated both ways"
    );
    let all = texts(&suite, &cache, "polarity");
    let expected = [
        ("A mess from start to end.", 0),
        ("A wonderful, warm little film.", 1),
        ("Dull and far too long.", 0),
        ("The battery died in a day.", 0),
        ("The best phone I have owned.", 1),
    ];
    let expected: Vec<_> = expected.iter().map(|(t, l)| (t.to_string(), *l)).collect();
    assert_eq!(all, expected);
}

#[test]
fn folders_bigbench_and_fortunes_are_read_and_cleaned() {
    let (suite, cache) = mini();
    let topic = texts(&suite, &cache, "topic");
    assert_eq!(topic.len(), 6);
    assert!(topic.contains(&("Knead the dough for ten minutes.".into(), 1)));
    let yesno = texts(&suite, &cache, "yesno");
    assert_eq!(
        yesno.len(),
        4,
        "the example with tied best scores is dropped"
    );
    assert!(yesno.contains(&("is ice cold?".into(), 0)), "{yesno:?}");
    let lang = texts(&suite, &cache, "lang");
    assert!(
        lang.contains(&("Ceci est une phrase inventee.".into(), 1)),
        "{lang:?}"
    );
    assert!(
        lang.contains(&("Bold words are still words.".into(), 0)),
        "{lang:?}"
    );
}

#[test]
fn prompts_and_label_words_come_from_the_suite() {
    let (suite, _) = mini();
    let task = suite.task("polarity").unwrap();
    assert_eq!(
        task.render_prompt("Great."),
        "Sentiment of: Great.\nAnswer:"
    );
    assert_eq!(task.class_names(), ["negative", "positive"]);
    assert_eq!(task.classes[1].label_word, "positive");
    assert_eq!(suite.caps(true).train, 1);
}

fn parse_err(text: &str) -> String {
    match Suite::parse(text, Path::new("bad.toml")) {
        Err(EvalError::Suite { file, reason }) => {
            assert_eq!(file, Path::new("bad.toml"));
            reason
        }
        other => panic!("expected a suite error, got {other:?}"),
    }
}

#[test]
fn invalid_suites_are_refused_with_a_reason() {
    let good = std::fs::read_to_string(fixture("eval-mini/suite.toml")).unwrap();
    let cases = [
        (
            good.replace("keys = [\"cooking\"]", "keys = [\"sport\"]"),
            "belongs to two classes",
        ),
        (
            good.replace("{text}\\nAnswer", "Answer"),
            "must contain {text}",
        ),
        (
            good.replace("name = \"lang\"", "name = \"topic\""),
            "defined twice",
        ),
        (
            good.replace("label_word = \"French\"", "label_word = \"English\""),
            "used twice",
        ),
        (good.replace("train = 2", "train = 0"), "at least 1"),
        (
            good.replace("format = \"fortunes\"", "format = \"csv\""),
            "csv",
        ),
        (good.replace("seed = 7", "seed = 7\ncolour = 1"), "colour"),
        (
            good.replace("max_chars = 60", "max_chars = \"sixty\""),
            "line 3:",
        ),
    ];
    for (text, needle) in cases {
        let reason = parse_err(&text);
        assert!(reason.contains(needle), "{needle:?} not in {reason:?}");
    }
}

#[test]
fn a_missing_cache_names_the_file_and_make_data() {
    let (suite, _) = mini();
    let err = load_task(
        &suite,
        suite.task("polarity").unwrap(),
        Path::new("/nonexistent"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("task polarity") && err.contains("ratings.txt"),
        "{err}"
    );
    assert!(err.contains("make data"), "{err}");
}

#[test]
fn paths_may_not_leave_the_cache() {
    let good = std::fs::read_to_string(fixture("eval-mini/suite.toml")).unwrap();
    let bad = good.replace("\"fortunes/en\"", "\"../../../etc/passwd\"");
    let suite = Suite::parse(&bad, Path::new("s.toml")).unwrap();
    let (_, cache) = mini();
    let err = load_task(&suite, suite.task("lang").unwrap(), &cache, false).unwrap_err();
    assert!(err.to_string().contains("without `..`"), "{err}");
}

#[test]
fn knots_data_prints_the_suite_and_its_split_sizes() {
    let dir = fixture("eval-mini");
    let run = |extra: &[&str]| {
        let suite = dir.join("suite.toml");
        let cache = dir.join("cache");
        let mut args = vec!["data", "--suite", suite.to_str().unwrap()];
        args.extend(["--cache", cache.to_str().unwrap()]);
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_knots"))
            .args(&args)
            .output()
            .unwrap()
    };
    let list = run(&["--list"]);
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success());
    assert!(
        out.contains("yesno (2 classes; bigbench: bb/task.json)"),
        "{out}"
    );
    let stats = run(&["--stats", "--task", "topic"]);
    let out = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    assert!(out.contains("| topic | sport | 3 | 1 | 1 | 1 |"), "{out}");
    assert!(
        out.contains("1 tasks: 2 train, 2 val, 2 test examples"),
        "{out}"
    );
    let unknown = run(&["--stats", "--task", "nope"]);
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success());
    assert!(err.contains("unknown task \"nope\""), "{err}");
}
