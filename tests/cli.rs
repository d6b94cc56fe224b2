//! `knots merge` as a user runs it: the real binary, its summary, its outputs and its errors.

use std::path::Path;
use std::process::{Command, Output};

use knots::adapters::LoraAdapter;

use crate::common::{fixture, read_matrices};

fn knots(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knots"))
        .args(args)
        .output()
        .expect("run knots")
}

fn golden_adapters(case: &str) -> Vec<String> {
    (0..4)
        .map(|i| {
            fixture(&format!("knots-golden/{case}/adapters/task_{i}"))
                .display()
                .to_string()
        })
        .collect()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn merges_to_a_peft_adapter_and_prints_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let mut args = vec!["merge", "--out", out.to_str().unwrap(), "--lambda", "0.6"];
    let adapters = golden_adapters("knots_ties");
    args.extend(adapters.iter().map(String::as_str));
    let o = knots(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = stdout(&o);
    assert!(
        summary.contains("with knots-ties: lambda 0.6, density 0.2"),
        "{summary}"
    );
    assert!(summary.contains("k = 32 in 8 modules"), "{summary}");
    let merged = LoraAdapter::load(&out).unwrap();
    assert_eq!((merged.config.r, merged.modules.len()), (32, 8));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("knots_merge.json")).unwrap()).unwrap();
    assert_eq!(record["method"], "knots-ties");
    assert_eq!(record["adapters"].as_array().unwrap().len(), 4);
    assert_eq!(
        merged.config.base_model_name_or_path.as_deref(),
        Some("sentence-transformers/all-MiniLM-L6-v2")
    );
}

#[test]
fn dense_results_export_at_a_requested_rank_with_the_error_reported() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = golden_adapters("ties");
    let run = |name: &str, rank: &str| {
        let out = dir.path().join(name);
        let mut args = vec![
            "merge",
            "--method",
            "ties",
            "--density",
            "0.3",
            "--lambda",
            "0.3",
            "--out",
            out.to_str().unwrap(),
        ];
        if !rank.is_empty() {
            args.extend(["--rank", rank]);
        }
        args.extend(adapters.iter().map(String::as_str));
        (knots(&args), out)
    };
    let (o, _) = run("no_rank", "");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--rank"), "{}", stderr(&o));

    let (o, out) = run("rank16", "16");
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o)
        .lines()
        .find(|l| l.contains("relative error"))
        .map(str::to_owned)
        .unwrap();
    let reported: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    // The reported error is the real one: compare the exported adapter with the exact result.
    let exact = read_matrices(&fixture("knots-golden/ties/expected.safetensors"));
    let merged = LoraAdapter::load(&out).unwrap().delta();
    let (mut diff, mut norm) = (0.0, 0.0);
    for (key, want) in &exact {
        let got = merged.modules[key.strip_suffix(".weight").unwrap()].to_dense();
        diff += got.relative_error(want).powi(2) * want.frobenius().powi(2);
        norm += want.frobenius().powi(2);
    }
    let actual = (diff / norm).sqrt();
    assert!(
        reported > 0.01 && (reported - actual).abs() < 1e-3 * actual.max(1e-3),
        "reported {reported}, actual {actual}"
    );
}

#[test]
fn bad_input_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    let adapters = golden_adapters("ta_sum");
    let missing = dir.path().join("nope");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["merge", "--out", out, "--density", "0", &adapters[0]],
            "density",
        ),
        (
            vec!["merge", "--out", out, "--lambda", "inf", &adapters[0]],
            "lambda",
        ),
        (
            vec![
                "merge",
                "--out",
                out,
                "--weights",
                "1,2,3",
                &adapters[0],
                &adapters[1],
            ],
            "--weights",
        ),
        (
            vec!["merge", "--out", out, missing.to_str().unwrap()],
            "adapter_config.json",
        ),
        (
            vec!["merge", "--out", out, "--isotropize", &adapters[0]],
            "isotropize",
        ),
        (
            vec![
                "merge",
                "--out",
                out,
                "--method",
                "core-iso-cts",
                "--common-fraction",
                "1.5",
                &adapters[0],
            ],
            "common_fraction",
        ),
    ];
    for (args, needle) in cases {
        let o = knots(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} should fail");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line expected: {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!Path::new(out).exists(), "{args:?}: nothing may be written");
    }
    let o = knots(&["merge", "--out", out, "--method", "knots", &adapters[0]]);
    assert!(
        !o.status.success() && stderr(&o).contains("knots-ties"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn weights_scale_each_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = golden_adapters("ta_sum");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "merge",
            "--method",
            "ta",
            "--format",
            "delta",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        args.extend(adapters[..2].iter().map(String::as_str));
        let o = knots(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        read_matrices(&out.join("delta.safetensors"))
    };
    let both = run("both", &[]);
    let first_only = run("first", &["--weights", "1,0"]);
    let a0 = LoraAdapter::load(Path::new(&adapters[0])).unwrap().delta();
    for (key, got) in &first_only {
        let want = a0.modules[key.strip_suffix(".weight").unwrap()].to_dense();
        assert!(got.relative_error(&want) < 1e-6, "{key}");
        assert!(
            both[key].relative_error(&want) > 0.1,
            "{key}: the second adapter must count"
        );
    }
}

/// A Core Space merge is low-rank: its PEFT export holds the same update as the dense delta, and
/// re-merging the duplicated set (a rank-deficient stack) stays finite.
#[test]
fn core_merges_export_exact_peft_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let mut adapters = golden_adapters("ta_sum");
    for method in ["core-tsv", "core-iso-cts", "core-ties"] {
        let run = |format: &str, adapters: &[String]| {
            let out = dir
                .path()
                .join(format!("{method}-{format}-{}", adapters.len()));
            let mut args = vec!["merge", "--method", method, "--format", format];
            args.extend(["--out", out.to_str().unwrap()]);
            args.extend(adapters.iter().map(String::as_str));
            let o = knots(&args);
            assert!(o.status.success(), "{method}: {}", stderr(&o));
            out
        };
        let peft = LoraAdapter::load(&run("peft", &adapters)).unwrap().delta();
        let dense = read_matrices(&run("delta", &adapters).join("delta.safetensors"));
        for (key, want) in &dense {
            let got = peft.modules[key.strip_suffix(".weight").unwrap()].to_dense();
            assert!(got.relative_error(want) < 1e-5, "{method}: {key}");
        }
    }
    // The same adapter directory twice is refused by name; a copy under another name is merged.
    let copy = dir.path().join("copy_of_task_0");
    std::fs::create_dir(&copy).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(Path::new(&adapters[0]).join(file), copy.join(file)).unwrap();
    }
    adapters.push(copy.display().to_string());
    for method in ["core-iso-c", "core-tsv", "core-iso-cts", "core-ties"] {
        let out = dir.path().join(format!("{method}-dup"));
        let mut args = vec!["merge", "--method", method, "--format", "delta"];
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(adapters.iter().map(String::as_str));
        let o = knots(&args);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        for (key, m) in read_matrices(&out.join("delta.safetensors")) {
            assert!(
                m.as_slice().iter().all(|x| x.is_finite()),
                "{method}: {key}"
            );
            assert!(m.frobenius() > 0.0, "{method}: {key}");
        }
    }
}

#[test]
fn eval_scores_an_experiments_arms_on_a_task() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        r#"
        models = ["all-minilm-l6-v2"]
        adapters = "models/adapters"
        state_db = ":memory:"

        [[experiments]]
        name = "offline"
        arms = [{ name = "single", model = "sentiment" },
                { name = "merged", model = "sentiment+news@knots-ties" }]
        "#,
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let args = [
        "eval",
        "--experiment",
        "offline",
        "--serve-config",
        config,
        "--task",
        "sentiment",
        "--test-per-task",
        "20",
    ];
    let o = knots(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (report["task"].as_str(), report["examples"].as_u64()),
        (Some("sentiment"), Some(20))
    );
    let arms = report["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 2);
    for a in arms {
        assert_eq!(a["metric"], "classification_accuracy", "{report}");
        assert!((0.0..=1.0).contains(&a["accuracy"].as_f64().unwrap()));
    }
    let o = knots(&[
        "eval",
        "--experiment",
        "nope",
        "--serve-config",
        config,
        "--task",
        "sentiment",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no experiment \"nope\""),
        "{}",
        stderr(&o)
    );
}
