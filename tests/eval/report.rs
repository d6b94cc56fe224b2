//! Reports: markdown tables, JSON, and a well-formed SVG with one line per method.

use knots::eval::metrics::Normalized;
use knots::eval::report::{
    Hits, LabelWordMethod, LabelWordReport, MethodResult, ParamsRecord, Report, ScalingPoint,
    ScalingSeries,
};
use knots::eval::stats::MeanCi;
use knots::eval::svg::scaling_svg;

fn series(method: &str, base: f64) -> ScalingSeries {
    let points = (2..=5)
        .map(|k| {
            let mean = base - 0.05 * k as f64;
            ScalingPoint {
                k,
                normalized: MeanCi {
                    mean,
                    lo: mean - 0.03,
                    hi: mean + 0.03,
                    n: 5,
                },
            }
        })
        .collect();
    ScalingSeries {
        method: method.into(),
        points,
    }
}

fn params() -> ParamsRecord {
    ParamsRecord {
        lambda: 0.6,
        density: 0.2,
        dare_p: 0.1,
        seed: 0,
        isotropize: false,
        common_fraction: 0.8,
    }
}

fn report() -> Report {
    let params = params();
    let method = |name: &str, n: f64| MethodResult {
        method: name.into(),
        params,
        accuracy: vec![0.5, 0.6],
        normalized: Normalized {
            per_task: vec![n, n],
            mean: n,
        },
        joint: Hits {
            at1: 0.4,
            at3: 0.6,
            at5: 0.7,
        },
    };
    Report {
        tasks: vec!["sentiment".into(), "news".into()],
        individual: vec![0.9, 0.8],
        test_counts: vec![100, 100],
        methods: vec![method("ties", 0.7), method("knots-ties", 0.75)],
        ensemble_joint: Some(Hits {
            at1: 0.5,
            at3: 0.7,
            at5: 0.8,
        }),
        scaling: vec![
            series("ties", 1.0),
            series("knots-ties", 1.05),
            series("a<b&c", 0.9),
        ],
        seconds: 1.0,
    }
}

fn label_word_report() -> LabelWordReport {
    let params = params();
    LabelWordReport {
        base_model: "smollm2-135m-instruct".into(),
        tasks: vec!["sentiment".into(), "language".into()],
        base: vec![0.8, 0.5],
        individual: vec![0.9, 1.0],
        methods: vec![LabelWordMethod {
            method: "knots-ties".into(),
            params,
            accuracy: vec![0.45, 0.8],
            normalized: Normalized {
                per_task: vec![0.5, 0.8],
                mean: 0.65,
            },
        }],
        test_per_task: 40,
        test_counts: vec![40, 40],
        seconds: 2.0,
    }
}

/// A minimal XML well-formedness check: balanced, properly nested tags, quoted attributes, no
/// stray `<` or `&` in text.
fn assert_well_formed(xml: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        let text = &rest[..start];
        assert!(!text.contains('>'), "stray > in {text:?}");
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;"]
                    .iter()
                    .any(|e| entity.starts_with(e))
            );
        }
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        assert!(!tag.contains('<'), "nested < in tag {tag:?}");
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in {tag:?}"
        );
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
        } else if !tag.ends_with('/') && !tag.starts_with('?') {
            stack.push(tag.split_whitespace().next().unwrap().to_owned());
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
    assert!(rest.trim().is_empty());
}

#[test]
fn the_svg_is_well_formed_with_one_line_and_band_per_method() {
    let svg = scaling_svg(&report().scaling);
    assert_well_formed(&svg);
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert_eq!(svg.matches("<path ").count(), 3);
    assert_eq!(svg.matches("<polygon ").count(), 3);
    assert!(svg.contains("data-method=\"knots-ties\""));
    assert!(svg.contains("a&lt;b&amp;c"), "method names are escaped");
    // Four points per line.
    let line = svg
        .lines()
        .find(|l| l.contains("<path class=\"line\""))
        .unwrap();
    assert_eq!(line.matches(['M', 'L']).count(), 4);
}

#[test]
fn the_checker_rejects_broken_xml() {
    for bad in [
        "<svg><g></svg>",
        "<svg>a < b</svg>",
        "<svg x=\"1></svg>",
        "<svg>&x;</svg>",
    ] {
        assert!(
            std::panic::catch_unwind(|| assert_well_formed(bad)).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn an_empty_chart_is_still_well_formed() {
    let svg = scaling_svg(&[]);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<path ").count(), 0);
}

#[test]
fn markdown_and_json_carry_every_number() {
    let r = report();
    let md = r.to_markdown();
    assert!(
        md.contains("| method | params | sentiment | news | mean |"),
        "{md}"
    );
    assert!(
        md.contains("| fine-tuned (absolute) | | 90.0 | 80.0 | 85.0 ± 2.5 |"),
        "{md}"
    );
    assert!(
        md.contains("| knots-ties | λ 0.6 d 0.2 p 0.1 | 75.0 (50.0) | 75.0 (60.0) | 75.0 ± 4.1 |"),
        "{md}"
    );
    assert!(
        md.contains("| ensemble | 50.0 ± 3.5 | 70.0 ± 3.2 | 80.0 ± 2.8 |"),
        "{md}"
    );
    assert!(
        md.contains("| ties | 40.0 ± 3.5 | 60.0 ± 3.5 | 70.0 ± 3.2 |"),
        "{md}"
    );
    assert!(
        md.contains("| method | k = 2 | k = 3 | k = 4 | k = 5 |"),
        "{md}"
    );
    assert!(md.contains("| ties | 90.0 [87.0, 93.0] |"), "{md}");
    let json: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
    assert_eq!(json["methods"][1]["method"], "knots-ties");
    assert_eq!(json["methods"][1]["joint"]["at3"], 0.6);
    assert_eq!(json["scaling"][0]["points"][0]["k"], 2);
}

#[test]
fn the_label_word_table_carries_base_own_and_merged_accuracy() {
    let md = label_word_report().to_markdown();
    assert!(
        md.contains("| method | params | sentiment | language | mean |"),
        "{md}"
    );
    assert!(
        md.contains("| base model (absolute) | | 80.0 | 50.0 | 65.0 ± 5.1 |"),
        "{md}"
    );
    assert!(
        md.contains("| knots-ties | λ 0.6 d 0.2 p 0.1 | 50.0 (45.0) | 80.0 (80.0) | 65.0 ± 5.4 |"),
        "{md}"
    );
    assert!(
        md.contains("| own adapter (absolute) | | 90.0 | 100.0 | 95.0 ± 2.4 |"),
        "{md}"
    );
}
