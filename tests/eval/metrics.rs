//! Metrics against hand-computed values.

use knots::eval::metrics::{
    JointLabels, accuracy, ensemble_max, hit_at_k, hits_at, normalized_accuracy,
};
use knots::eval::stats::{binomial, combinations, mean_ci95, t975};

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

#[test]
fn accuracy_counts_argmax_hits() {
    let scores = vec![
        vec![0.9, 0.1],
        vec![0.2, 0.8],
        vec![0.6, 0.4],
        vec![0.3, 0.7],
    ];
    close(accuracy(&scores, &[0, 1, 1, 1]).unwrap(), 0.75);
}

#[test]
fn hits_at_k_shares_credit_among_ties() {
    // Gold 2 has one strictly higher label (0) and ties with label 3.
    let row = [0.9f32, 0.1, 0.5, 0.5, 0.2];
    close(hit_at_k(&row, 2, 1).unwrap(), 0.0);
    close(hit_at_k(&row, 2, 2).unwrap(), 0.5);
    close(hit_at_k(&row, 2, 3).unwrap(), 1.0);
    // All equal: exactly chance.
    close(hit_at_k(&[1.0; 4], 0, 1).unwrap(), 0.25);
    close(hit_at_k(&[1.0; 4], 0, 3).unwrap(), 0.75);
    let scores = vec![row.to_vec(), vec![0.0, 1.0, 0.5, 0.4, 0.3]];
    let h = hits_at(&scores, &[2, 4], &[1, 3, 5]).unwrap();
    // Example 2: gold 4 ranks 4th.
    close(h[0], 0.0);
    close(h[1], (1.0 + 0.0) / 2.0);
    close(h[2], 1.0);
}

#[test]
fn metric_inputs_that_do_not_fit_are_errors() {
    assert!(hit_at_k(&[0.1, 0.2], 2, 1).is_err());
    assert!(hit_at_k(&[f32::NAN, 0.2], 1, 1).is_err());
    assert!(hits_at(&[vec![0.1]], &[0, 0], &[1]).is_err());
    assert!(normalized_accuracy(&[0.5], &[0.0]).is_err());
    assert!(normalized_accuracy(&[0.5, 0.4], &[0.5]).is_err());
}

#[test]
fn normalized_accuracy_divides_by_the_individual_adapter() {
    let n = normalized_accuracy(&[0.45, 0.80, 0.30], &[0.90, 0.80, 0.60]).unwrap();
    assert_eq!(n.per_task.len(), 3);
    close(n.per_task[0], 0.5);
    close(n.per_task[1], 1.0);
    close(n.per_task[2], 0.5);
    close(n.mean, 2.0 / 3.0);
}

#[test]
fn joint_labels_keep_equal_names_of_different_tasks_apart() {
    let joint = JointLabels::new(&[2, 3, 1]);
    assert_eq!(joint.len(), 6);
    assert_eq!(joint.index(1, 0), Some(2));
    assert_eq!(joint.index(2, 0), Some(5));
    assert_eq!(joint.index(0, 2), None, "task 0 has two classes");
    assert_eq!(joint.label(4), Some((1, 2)));
    assert_eq!(joint.label(6), None);
}

#[test]
fn the_ensemble_takes_each_labels_best_score() {
    let a = vec![vec![0.9, 0.1, 0.0], vec![0.2, 0.3, 0.1]];
    let b = vec![vec![0.0, 0.5, 0.7], vec![0.1, 0.0, 0.6]];
    let e = ensemble_max(&[a, b]).unwrap();
    assert_eq!(e, vec![vec![0.9, 0.5, 0.7], vec![0.2, 0.3, 0.6]]);
    assert!(ensemble_max(&[vec![vec![0.0]], vec![vec![0.0, 1.0]]]).is_err());
    assert!(ensemble_max(&[]).is_err());
}

#[test]
fn the_confidence_interval_is_student_t() {
    // values 1..5: mean 3, s² = 2.5, s/√n = √0.5, t(0.975, 4) = 2.7764.
    let ci = mean_ci95(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    close(ci.mean, 3.0);
    let half = 2.7764 * 0.5f64.sqrt();
    close(ci.lo, 3.0 - half);
    close(ci.hi, 3.0 + half);
    assert_eq!(ci.n, 5);
    let one = mean_ci95(&[0.7]).unwrap();
    assert_eq!((one.lo, one.hi), (0.7, 0.7));
    assert!(mean_ci95(&[]).is_err());
    // Beyond the table: t(0.975, 40) = 2.0211, t(0.975, 120) = 1.9799.
    assert!((t975(40) - 2.0211).abs() < 1e-3, "{}", t975(40));
    assert!((t975(120) - 1.9799).abs() < 1e-3, "{}", t975(120));
    assert!(t975(31) < t975(30) && t975(31) > t975(32));
}

#[test]
fn combinations_are_all_or_distinct_seeded_draws() {
    assert_eq!(binomial(8, 3), 56);
    assert_eq!(binomial(3, 5), 0);
    let all = combinations(4, 2, 10, 0);
    assert_eq!(
        all,
        vec![
            vec![0, 1],
            vec![0, 2],
            vec![0, 3],
            vec![1, 2],
            vec![1, 3],
            vec![2, 3]
        ]
    );
    let drawn = combinations(8, 4, 10, 5);
    assert_eq!(drawn.len(), 10);
    let unique: std::collections::HashSet<_> = drawn.iter().collect();
    assert_eq!(unique.len(), 10);
    assert!(
        drawn
            .iter()
            .all(|c| c.len() == 4 && c.windows(2).all(|w| w[0] < w[1]))
    );
    assert_eq!(drawn, combinations(8, 4, 10, 5));
    assert_ne!(drawn, combinations(8, 4, 10, 6));
    assert_eq!(combinations(8, 8, 10, 0), vec![(0..8).collect::<Vec<_>>()]);
}
