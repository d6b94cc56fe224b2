//! The benchmark run on real data with the committed adapters (`models/adapters/<task>`,
//! trained by `knots train`): two tasks, a small grid, every part of the report filled in.

use knots::adapters::LoraAdapter;
use knots::eval::{Bench, BenchSettings, SearchGrid, Suite, load_task};
use knots::merge::{Method, Silent};

use super::cache::repo;

#[test]
fn bench_reports_per_task_joint_and_scaling_results() {
    let suite = Suite::load(&repo("data/suite.toml")).unwrap();
    let names = ["sentiment", "news"];
    let defs: Vec<_> = names.iter().map(|n| suite.task(n).unwrap()).collect();
    let tasks: Vec<_> = defs
        .iter()
        .map(|d| load_task(&suite, d, &repo("data/cache"), true).expect("run `make data`"))
        .collect();
    let adapters: Vec<_> = names
        .iter()
        .map(|n| LoraAdapter::load(&repo(&format!("models/adapters/{n}"))).unwrap())
        .collect();
    let label_texts: Vec<Vec<String>> = defs
        .iter()
        .map(|d| d.classes.iter().map(|c| c.label_text.clone()).collect())
        .collect();
    let encoder = crate::engine::minilm();
    let bench = Bench::new(encoder, &tasks, &adapters, &label_texts, &Silent).unwrap();
    let settings = BenchSettings {
        methods: vec![Method::Ta, Method::KnotsTies],
        grid: SearchGrid {
            lambdas: vec![0.5, 1.0],
            densities: vec![0.5],
            dare_ps: vec![0.1],
            dare_seeds: vec![0],
            isotropize: vec![false, true],
            common_fractions: vec![0.6, 0.8],
        },
        ..BenchSettings::quick(2)
    };
    let report = bench.run(&settings).unwrap();
    eprintln!("{}", report.to_markdown());
    assert_eq!(report.tasks, names);
    // Each fine-tuned adapter beats chance on its own task.
    for (acc, task) in report.individual.iter().zip(&tasks) {
        assert!(
            *acc > 1.0 / task.classes.len() as f64,
            "{}: {acc}",
            task.name
        );
    }
    assert_eq!(report.methods.len(), 2);
    for m in &report.methods {
        assert!(m.params.lambda == 0.5 || m.params.lambda == 1.0);
        assert!(m.accuracy.iter().all(|a| (0.0..=1.0).contains(a)));
        assert!(m.normalized.mean > 0.0);
        assert!(m.joint.at1 <= m.joint.at3 && m.joint.at3 <= m.joint.at5 && m.joint.at5 <= 1.0);
    }
    let ensemble = report.ensemble_joint.unwrap();
    assert!(ensemble.at1 > 0.0 && ensemble.at5 >= ensemble.at1);
    // Scaling at k = 2 of 2 tasks: one combination, the full merge with the searched params.
    for (series, m) in report.scaling.iter().zip(&report.methods) {
        let point = series.points[0];
        assert_eq!((point.k, point.normalized.n), (2, 1));
        assert!(point.normalized.mean > 0.0, "{}", m.method);
    }
}

/// The causal label-word benchmark on real prompts with the committed `sentiment-lm` adapter,
/// standing for two tasks: task arithmetic at λ 0.5 of an adapter with itself is that adapter,
/// so every task's merged accuracy equals its own and normalises to exactly 1.
#[test]
fn label_word_bench_normalises_by_each_tasks_own_adapter() {
    use knots::eval::{LabelWordBench, LabelWordSettings, LabelWordTask};
    use knots::labels::{CausalTask, answer_tokens, label_word_accuracy};

    let suite = Suite::load(&repo("data/suite.toml")).unwrap();
    let def = suite.task("sentiment").unwrap();
    let data = load_task(&suite, def, &repo("data/cache"), true).expect("run `make data`");
    let adapter = LoraAdapter::load(&repo("models/adapters/sentiment-lm")).unwrap();
    let words: Vec<String> = def.classes.iter().map(|c| c.label_word.clone()).collect();
    let again = LoraAdapter {
        name: "sentiment-lm-again".into(),
        ..adapter.clone()
    };
    let task = |name, adapter| LabelWordTask {
        name,
        prompt: &def.prompt,
        label_words: words.clone(),
        val: &data.splits.val,
        test: &data.splits.test,
        adapter,
    };
    let tasks = [task("sentiment", &adapter), task("sentiment-again", &again)];
    let model = crate::engine::smollm2();
    let bench = LabelWordBench::new(model, &tasks, &Silent).unwrap();
    let settings = LabelWordSettings {
        grid: SearchGrid {
            lambdas: vec![0.5],
            densities: vec![1.0],
            dare_ps: vec![0.1],
            dare_seeds: vec![0],
            isotropize: vec![false, true],
            common_fractions: vec![0.6, 0.8],
        },
        test_per_task: 4,
        search_per_task: 2,
        ..LabelWordSettings::quick(vec![Method::Ta])
    };
    let report = bench.run("smollm2-135m-instruct", &settings).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());

    let answers = answer_tokens(model, &words).unwrap();
    let causal = CausalTask {
        task: "sentiment",
        prompt: &def.prompt,
        label_words: &words,
        train: &[],
        val: &[],
    };
    let base = label_word_accuracy(model, &causal, &answers, None, &data.splits.test[..4]).unwrap();
    assert_eq!(report.base, vec![base, base]);
    assert_eq!(report.individual[0], report.individual[1]);
    let ta = &report.methods[0];
    assert_eq!(ta.method, "ta");
    assert_eq!(ta.params.lambda, 0.5);
    for (t, &acc) in ta.accuracy.iter().enumerate() {
        assert_eq!(acc, report.individual[t], "task {t}");
        assert!((ta.normalized.per_task[t] - 1.0).abs() < 1e-12);
    }
}
