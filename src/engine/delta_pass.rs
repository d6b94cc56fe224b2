//! Every delta of a projection group in one pass over the worker pool, or inside the base
//! product's own pass.
//!
//! A batched step's rows carry different deltas: low-rank factors, packed sparse `ΔW`s, dense
//! `ΔW`s. Each delta's work is split into jobs (a low-rank delta is one job for all its rows, so
//! its factors stream once; a `ΔW` is sixteen jobs of adjacent outputs, so it streams once, in
//! order, for all its rows) and every job of every layer of the group goes into one list. The
//! jobs write each delta's update into buffers of their own, never into the base output, so they
//! can run in the same pass as the base product ([`super::qmatmul::PackedMatrix::matmul_with`]):
//! a worker streaming a delta from memory then runs beside one doing the compute-bound base
//! product, instead of every delta waiting for a pass of its own. [`DeltaPass::add_to`] adds
//! the updates to the base outputs afterwards.
//!
//! Each row's update is summed in the same order whatever the other rows of the batch are, so a
//! row's result does not depend on its batch.

use std::sync::atomic::{AtomicBool, Ordering};

use super::host::{self, Scatter};
use super::low_rank::{self, LowRankPanels};
use super::masked::{self, MaskedMatrix};

/// Outputs of a `ΔW` job: about sixteen jobs per matrix, so two workers stay balanced.
const TILES: usize = 16;

/// What one delta adds to its rows.
pub enum DeltaWork<'a> {
    /// `(x · aᵀ) · bᵀ` with the factors packed.
    LowRank(&'a LowRankPanels),
    /// `x · ΔWᵀ` with `ΔW` packed.
    Masked(&'a MaskedMatrix),
    /// `x · ΔWᵀ` with `ΔW: out_dim × in_dim` row-major.
    Dense(&'a [f32]),
}

/// One delta of the pass: the output it changes (`target`), its rows of the batch and its work.
/// A row belongs to one delta of a target at most.
pub struct DeltaRows<'a> {
    pub target: usize,
    pub rows: &'a [u32],
    pub work: DeltaWork<'a>,
}

/// A job: delta `delta`'s outputs `first..first + n` (all of them for a low-rank delta).
struct Job {
    delta: usize,
    first: usize,
    n: usize,
}

/// The deltas of one projection group, all reading the same input `x: (rows, in_dim)`, and
/// the update buffers their jobs fill: per target, one `out_dim` row per delta row, each
/// delta's rows together (from `slots[delta]` on).
pub struct DeltaPass<'a> {
    x: &'a [f32],
    in_dim: usize,
    out_dims: Vec<usize>,
    deltas: Vec<DeltaRows<'a>>,
    /// Each delta's first row in its target's update buffer.
    slots: Vec<usize>,
    jobs: Vec<Job>,
    /// Delta rows per target (the update buffers' heights).
    update_rows: Vec<usize>,
    /// The update buffers, filled by [`Self::run`].
    updates: Vec<Vec<f32>>,
}

impl<'a> DeltaPass<'a> {
    /// The jobs of `deltas` over `x: (rows, in_dim)`, for targets of widths `out_dims`; deltas
    /// that do not fit ([`DeltaRows::fits`]) are left out.
    pub fn new(
        x: &'a [f32],
        in_dim: usize,
        out_dims: Vec<usize>,
        deltas: Vec<DeltaRows<'a>>,
    ) -> Self {
        let rows = x.len() / in_dim.max(1);
        let deltas: Vec<DeltaRows<'a>> = deltas
            .into_iter()
            .filter(|d| d.fits(in_dim, &out_dims, rows))
            .collect();
        let mut update_rows = vec![0; out_dims.len()];
        let slots = (deltas.iter())
            .map(|d| {
                update_rows[d.target] += d.rows.len();
                update_rows[d.target] - d.rows.len()
            })
            .collect();
        let mut jobs = Vec::new();
        // Low-rank jobs first, largest first, so the last jobs the workers pick up are short.
        let mut low_rank: Vec<(usize, usize)> = (deltas.iter().enumerate())
            .filter_map(|(i, d)| match d.work {
                DeltaWork::LowRank(p) => {
                    let blocks = d.rows.len().div_ceil(low_rank::ROWS);
                    Some((i, blocks * p.values_read()))
                }
                _ => None,
            })
            .collect();
        low_rank.sort_by_key(|&(_, cost)| std::cmp::Reverse(cost));
        jobs.extend(low_rank.iter().map(|&(delta, _)| Job {
            delta,
            first: 0,
            n: out_dims[deltas[delta].target],
        }));
        for (i, d) in deltas.iter().enumerate() {
            if matches!(d.work, DeltaWork::LowRank(_)) {
                continue;
            }
            let out_dim = out_dims[d.target];
            // A packed ΔW's jobs take whole groups of its outputs.
            let unit = match d.work {
                DeltaWork::Masked(_) => masked::GROUP,
                _ => 1,
            };
            let width = out_dim.div_ceil(TILES).next_multiple_of(unit).max(1);
            jobs.extend((0..out_dim).step_by(width).map(|first| Job {
                delta: i,
                first,
                n: width.min(out_dim - first),
            }));
        }
        Self {
            x,
            in_dim,
            out_dims,
            deltas,
            slots,
            jobs,
            update_rows,
            updates: Vec::new(),
        }
    }

    /// Jobs to run.
    #[cfg(test)]
    fn jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Runs the jobs with `schedule(jobs, run)` and returns what it returns. `schedule` calls
    /// `run(j)` for every `j < jobs` (from any of the pool's threads) before it returns, and may
    /// run other work beside them; a job asked for twice runs once, and a job never asked for
    /// is a panic (its update would be missing).
    pub fn run<R>(&mut self, schedule: impl FnOnce(usize, &(dyn Fn(usize) + Sync)) -> R) -> R {
        let lens: Vec<usize> = (self.update_rows.iter().zip(&self.out_dims))
            .map(|(&n, &o)| n * o)
            .collect();
        let (x, in_dim, out_dims, deltas, slots, jobs) = (
            self.x,
            self.in_dim,
            &self.out_dims,
            &self.deltas,
            &self.slots,
            &self.jobs,
        );
        let claimed: Vec<AtomicBool> = jobs.iter().map(|_| AtomicBool::new(false)).collect();
        let mut result = None;
        let fill = |scatter: &Scatter<'_>| {
            let run = |j: usize| {
                if claimed[j].swap(true, Ordering::AcqRel) {
                    return;
                }
                let (job, d) = (&jobs[j], &deltas[jobs[j].delta]);
                let at = Place {
                    slot: slots[job.delta],
                    out_dim: out_dims[d.target],
                };
                // SAFETY: this job runs once (claimed above); it writes only its delta's rows
                // of its target's update, at outputs `first..first + n`, and no two deltas
                // share a row there, nor two jobs of a delta an output.
                unsafe { run_job(scatter, x, in_dim, at, d, job) };
            };
            result = Some(schedule(jobs.len(), &run));
            assert!(
                claimed.iter().all(|c| c.load(Ordering::Acquire)),
                "a delta job was never run"
            );
        };
        // SAFETY: `fill` writes every position or panics: each delta's rows are written in full
        // by its jobs (a low-rank job writes all of its rows' outputs, the tiles of a `ΔW` cover
        // its outputs), and every job runs (checked above).
        self.updates = unsafe { host::scattered(&lens, fill) };
        result.expect("the schedule ran")
    }

    /// Runs the jobs over the pool on their own.
    pub fn run_alone(&mut self) {
        self.run(|n, run| host::par_for(n, run));
    }

    /// Adds each delta's update to its rows of `sums[target]` (`rows × out_dim` each), after
    /// [`Self::run`].
    pub fn add_to(&self, sums: &mut [&mut [f32]]) {
        for (d, &slot) in self.deltas.iter().zip(&self.slots) {
            let out_dim = self.out_dims[d.target];
            let update = &self.updates[d.target][slot * out_dim..];
            for (u, &r) in update.chunks_exact(out_dim).zip(d.rows) {
                let at = r as usize * out_dim;
                host::add_assign(&mut sums[d.target][at..at + out_dim], u);
            }
        }
    }
}

/// Where a job's delta writes: its first row in the target's update, of `out_dim` values each.
#[derive(Clone, Copy)]
struct Place {
    slot: usize,
    out_dim: usize,
}

impl DeltaRows<'_> {
    /// Whether this delta fits a pass over `rows` rows of `in_dim` inputs into targets of
    /// widths `out_dims`: its target exists, its rows are inside the batch, and its factors or
    /// `ΔW` have the target's shape. A delta that does not fit must be applied another way
    /// (the pass leaves it out rather than read out of bounds).
    pub fn fits(&self, in_dim: usize, out_dims: &[usize], rows: usize) -> bool {
        let Some(&out_dim) = out_dims.get(self.target) else {
            return false;
        };
        if in_dim == 0 || self.rows.iter().any(|&r| r as usize >= rows) {
            return false;
        }
        match self.work {
            DeltaWork::LowRank(p) => p.shape() == (out_dim, in_dim),
            DeltaWork::Masked(m) => m.shape() == (out_dim, in_dim),
            DeltaWork::Dense(w) => w.len() == out_dim * in_dim,
        }
    }
}

/// One job of [`DeltaPass::run`].
///
/// # Safety
/// No other thread writes the job's positions of its target's update while it runs: its
/// delta's rows, outputs `first..first + n`.
unsafe fn run_job(
    scatter: &Scatter<'_>,
    x: &[f32],
    in_dim: usize,
    at: Place,
    d: &DeltaRows<'_>,
    job: &Job,
) {
    let out_dim = at.out_dim;
    match d.work {
        DeltaWork::LowRank(p) => {
            for (b, block) in d.rows.chunks(low_rank::ROWS).enumerate() {
                let first = at.slot + b * low_rank::ROWS;
                // SAFETY: these rows of the update belong to this delta alone, whose one job
                // this is (the caller's guarantee).
                let mut dst: Vec<&mut [f32]> = (0..block.len())
                    .map(|k| unsafe { scatter.slice_mut(d.target, (first + k) * out_dim, out_dim) })
                    .collect();
                let xs: Vec<&[f32]> = (block.iter())
                    .map(|&r| &x[r as usize * in_dim..(r as usize + 1) * in_dim])
                    .collect();
                p.products(&xs, &mut dst);
            }
        }
        DeltaWork::Masked(_) | DeltaWork::Dense(_) => {
            let (first, n) = (job.first, job.n);
            let mut acc = vec![0f32; d.rows.len() * n];
            match d.work {
                DeltaWork::Masked(m) => m.products(first, n, x, d.rows, &mut acc),
                DeltaWork::Dense(w) => {
                    for j in 0..n {
                        let o = first + j;
                        host::dot_rows(
                            &mut acc[j..],
                            n,
                            x,
                            d.rows,
                            &w[o * in_dim..(o + 1) * in_dim],
                        );
                    }
                }
                DeltaWork::LowRank(_) => unreachable!("handled above"),
            }
            for (k, values) in acc.chunks_exact(n).enumerate() {
                // SAFETY: outputs `first..first + n` of this delta's rows belong to this job.
                unsafe { scatter.write_slice(d.target, (at.slot + k) * out_dim + first, values) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::low_rank::tests::values;
    use super::*;

    /// `x_r · Mᵀ` for a row-major `m: out × in`, in f64.
    fn reference(x: &[f32], r: usize, m: &[f32], in_dim: usize, out_dim: usize) -> Vec<f64> {
        (0..out_dim)
            .map(|o| {
                (0..in_dim)
                    .map(|i| x[r * in_dim + i] as f64 * m[o * in_dim + i] as f64)
                    .sum()
            })
            .collect()
    }

    /// Low-rank, packed and dense deltas of two targets in one pass: each row gets its own
    /// delta's update (within f32 rounding of a direct product), rows of no delta get nothing,
    /// and a job list run in reverse gives the same bits.
    #[test]
    fn each_row_gets_its_own_deltas_update() {
        // Ranks that take the hidden columns sixteen, eight and one at a time.
        for rank in [3, 8, 27] {
            each_row_gets_its_own_deltas_update_at_rank(rank);
        }
    }

    fn each_row_gets_its_own_deltas_update_at_rank(rank: usize) {
        let (rows, in_dim) = (6, 48);
        let out_dims = vec![36, 20];
        let x = values(rows * in_dim, 1);
        let (a, b) = (values(rank * in_dim, 2), values(out_dims[0] * rank, 3));
        let factors = LowRankPanels::pack(&a, &b, rank, in_dim, out_dims[0]).expect("shapes");
        let mut sparse = values(out_dims[0] * in_dim, 4);
        sparse.iter_mut().step_by(3).for_each(|v| *v = 0.0);
        sparse.iter_mut().skip(1).step_by(3).for_each(|v| *v = 0.0);
        let masked = MaskedMatrix::pack(&sparse, out_dims[0], in_dim).expect("sparse enough");
        let dense = values(out_dims[1] * in_dim, 5);
        let (low_rows, masked_rows, dense_rows) = ([0u32, 3], [1u32, 4, 5], [2u32, 3]);
        let deltas = || {
            vec![
                DeltaRows {
                    target: 0,
                    rows: &low_rows,
                    work: DeltaWork::LowRank(&factors),
                },
                DeltaRows {
                    target: 0,
                    rows: &masked_rows,
                    work: DeltaWork::Masked(&masked),
                },
                DeltaRows {
                    target: 1,
                    rows: &dense_rows,
                    work: DeltaWork::Dense(&dense),
                },
            ]
        };
        let mut sums: Vec<Vec<f32>> = out_dims.iter().map(|&o| vec![1.0; rows * o]).collect();
        let mut pass = DeltaPass::new(&x, in_dim, out_dims.clone(), deltas());
        // One low-rank job; 36 packed outputs in whole groups of 16 (16, 16, 4), 20 dense ones
        // in 10 tiles of 2.
        assert_eq!(pass.jobs(), 1 + 3 + 10);
        pass.run_alone();
        pass.add_to(
            &mut sums
                .iter_mut()
                .map(|s| s.as_mut_slice())
                .collect::<Vec<_>>(),
        );

        // ΔW of the low-rank delta: b · a, out × in.
        let low: Vec<f32> = (0..out_dims[0] * in_dim)
            .map(|k| {
                let (o, i) = (k / in_dim, k % in_dim);
                (0..rank).map(|j| b[o * rank + j] * a[j * in_dim + i]).sum()
            })
            .collect();
        for r in 0..rows {
            let want0 = match r {
                0 | 3 => reference(&x, r, &low, in_dim, out_dims[0]),
                1 | 4 | 5 => reference(&x, r, &sparse, in_dim, out_dims[0]),
                _ => vec![0.0; out_dims[0]],
            };
            let want1 = match r {
                2 | 3 => reference(&x, r, &dense, in_dim, out_dims[1]),
                _ => vec![0.0; out_dims[1]],
            };
            for (t, want) in [want0, want1].iter().enumerate() {
                let got = &sums[t][r * out_dims[t]..(r + 1) * out_dims[t]];
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (*g as f64 - (1.0 + w)).abs() < 1e-4,
                        "target {t} row {r}: {g} vs {}",
                        1.0 + w
                    );
                }
            }
        }

        let mut again = DeltaPass::new(&x, in_dim, out_dims.clone(), deltas());
        again.run(|n, run| (0..n).rev().for_each(run));
        assert_eq!(again.updates, pass.updates);
        // A job asked for twice runs once.
        let mut twice = DeltaPass::new(&x, in_dim, out_dims.clone(), deltas());
        twice.run(|n, run| (0..n).chain(0..n).for_each(run));
        assert_eq!(twice.updates, pass.updates);
    }

    /// A schedule that leaves a job out panics instead of leaving its update unwritten.
    #[test]
    #[should_panic(expected = "never run")]
    fn a_job_left_out_of_the_schedule_is_a_panic() {
        let x = values(2 * 8, 1);
        let w = values(4 * 8, 2);
        let mut pass = DeltaPass::new(
            &x,
            8,
            vec![4],
            vec![DeltaRows {
                target: 0,
                rows: &[1],
                work: DeltaWork::Dense(&w),
            }],
        );
        pass.run(|n, run| (1..n).for_each(run));
    }

    /// A row's result is the same to the bit whichever rows share its delta, its block of four
    /// and the pass (what makes batched requests give exactly what each gives alone), for a
    /// low-rank and a packed delta side by side.
    #[test]
    fn a_rows_result_does_not_depend_on_the_other_rows() {
        let (rows, in_dim, rank) = (7, 48, 27);
        let out_dims = [40, 19];
        let x = values(rows * in_dim, 1);
        let a = values(rank * in_dim, 2);
        let factors = LowRankPanels::pack(&a, &values(out_dims[0] * rank, 3), rank, in_dim, 40)
            .expect("shapes");
        let mut sparse = values(out_dims[1] * in_dim, 4);
        sparse.iter_mut().step_by(2).for_each(|v| *v = 0.0);
        let masked = MaskedMatrix::pack(&sparse, out_dims[1], in_dim).expect("sparse enough");
        // Target 0 gets the low-rank delta on `groups`' rows; target 1 the packed one on the
        // same rows, so the two share the pass.
        let run = |groups: &[&[u32]]| -> Vec<Vec<f32>> {
            let mut deltas = Vec::new();
            for &rows in groups {
                deltas.push(DeltaRows {
                    target: 0,
                    rows,
                    work: DeltaWork::LowRank(&factors),
                });
                deltas.push(DeltaRows {
                    target: 1,
                    rows,
                    work: DeltaWork::Masked(&masked),
                });
            }
            let mut sums: Vec<Vec<f32>> = out_dims.iter().map(|&o| vec![0.5; rows * o]).collect();
            let mut pass = DeltaPass::new(&x, in_dim, out_dims.to_vec(), deltas);
            pass.run_alone();
            pass.add_to(&mut sums.iter_mut().map(Vec::as_mut_slice).collect::<Vec<_>>());
            sums
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let together = run(&[&[6, 0, 3, 1, 5, 2, 4]]);
        let split = run(&[&[2], &[4, 0], &[1, 6, 5, 3]]);
        for r in 0..rows {
            let alone = run(&[&[r as u32]]);
            for (t, &o) in out_dims.iter().enumerate() {
                let row = r * o..(r + 1) * o;
                assert_eq!(
                    bits(&together[t][row.clone()]),
                    bits(&alone[t][row.clone()]),
                    "row {r}"
                );
                assert_eq!(
                    bits(&split[t][row.clone()]),
                    bits(&alone[t][row.clone()]),
                    "row {r}"
                );
                assert!(
                    alone[t][row].iter().all(|v| v.is_finite() && *v != 0.5),
                    "row {r}"
                );
            }
        }
    }

    /// A delta whose factors do not fit its target, or whose rows lie outside the batch, is left
    /// out instead of read out of bounds.
    #[test]
    fn misfitting_deltas_are_left_out() {
        let x = values(2 * 8, 1);
        // Factors of a 5 × 8 delta, for a target 4 wide.
        let factors =
            LowRankPanels::pack(&values(2 * 8, 2), &values(5 * 2, 3), 2, 8, 5).expect("shapes");
        let (outside, w) = ([7u32], values(32, 4));
        let pass = DeltaPass::new(
            &x,
            8,
            vec![4],
            vec![
                DeltaRows {
                    target: 0,
                    rows: &[0],
                    work: DeltaWork::LowRank(&factors),
                },
                DeltaRows {
                    target: 0,
                    rows: &outside,
                    work: DeltaWork::Dense(&w),
                },
                DeltaRows {
                    target: 1,
                    rows: &[1],
                    work: DeltaWork::Dense(&w),
                },
            ],
        );
        assert_eq!(pass.jobs(), 0);
    }
}
