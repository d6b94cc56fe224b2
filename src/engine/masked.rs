//! Dense deltas with many exact zeros, packed as sixteen-wide masks and their nonzero values.
//!
//! TIES, DARE and DARE-TIES merges keep only a fraction of each adapter's entries (TIES: 20% by
//! default), so a merged `ΔW` is dense in shape but mostly zeros. A batched decode step reads
//! every byte of it for the few rows that use it, so its size is its cost. [`MaskedMatrix`]
//! keeps it in groups of sixteen adjacent outputs: for each input, one 16-bit mask of the
//! group's outputs that have a nonzero weight there, then those weights in order. That is
//! `0.125 + 4·d` bytes per entry at density `d` instead of 4, and every kept value exact (f32).
//!
//! A product walks a group's inputs in order. On AVX-512 each input's weights are put in their
//! sixteen output lanes of one register by one expanding load (`vexpandps`: the mask picks the
//! lanes, the values fill them in order), and multiplied with up to four input rows' values at
//! that input while they sit there: one multiply-add per row, into sixteen outputs at once, with
//! no horizontal sums. Each row sums its inputs in four chains (input `i` in chain `i % 4`), in
//! input order, and adds the chains at the end ([`reference_sums`] is the same order without
//! SIMD), so a row's result does not depend on which other rows are in the product.
//!
//! Measured on random matrices of the serving benchmark's dense TIES set's shapes (q, k, v and o
//! of 30 layers, 36% nonzero, 41.5 MB; two rows): the expanding load and four chains run at
//! 37 GB/s from memory and 1.0 ms from cache, against 29 GB/s and 1.26 ms for the per-lane
//! permutation with its indices counted from the mask and two chains.
//! Without asking for the values ahead, the stream from memory falls to 10 GB/s.
//!
//! On AVX2 there is no expanding load: each eight-lane half of an input's weights is a masked
//! load of as many values as the half's mask has bits, then a permutation that spreads them to
//! their lanes, both controls read from small tables. On the same matrices on a Zen 3 (one
//! thread, two rows), that takes 6.5 ms, against 9.0 with the controls computed in registers:
//! the AVX2 copy is bound by its unpacking, not by memory. A register holds one half, so the
//! kernel makes one pass per half; on CPUs without AVX-512 a group's values are therefore kept
//! as two streams ([`Layout::Halves`]), every input's low-half values and then every input's
//! high-half values, so that each pass reads one stream and moves along it by its own half's
//! bit count. With one stream the second pass also had to count the first half's bits of every
//! input to find its values: a 3,072 × 4,096 matrix at 36% nonzero took 3.0 ms on two rows,
//! against 2.2 ms with two streams (Zen 3, one thread, the same bits).

/// Outputs per group (one per lane of a 512-bit register).
pub const GROUP: usize = 16;

/// Above this fraction of nonzero entries the packed form saves too little to pay for its
/// unpacking; the matrix stays dense.
pub const MAX_DENSITY: f64 = 0.75;

/// How a group's nonzero values are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Input by input, lane by lane: one stream (the AVX-512 kernel's expanding loads).
    Whole,
    /// Input by input, lanes 0–7; then input by input, lanes 8–15: a stream per eight-lane
    /// half (the AVX2 kernel's passes).
    Halves,
}

impl Layout {
    /// The layout this CPU's kernel reads.
    fn native() -> Self {
        #[cfg(target_arch = "x86_64")]
        if !avx512::available() && avx2::available() {
            return Layout::Halves;
        }
        Layout::Whole
    }
}

/// A `rows × cols` matrix as per-group masks and packed nonzero values.
#[derive(Debug, Clone)]
pub struct MaskedMatrix {
    rows: usize,
    cols: usize,
    /// `groups × cols` masks: bit `l` of mask `g·cols + i` is entry `(g·GROUP + l, i)`.
    masks: Vec<u16>,
    /// Where each group's values start in `values` (`groups + 1` entries).
    starts: Vec<usize>,
    /// With [`Layout::Halves`], where each group's high-half stream starts in `values`.
    highs: Vec<usize>,
    /// The nonzero values, group by group, in `layout`'s order.
    values: Vec<f32>,
    layout: Layout,
}

/// One group of a [`MaskedMatrix`]: its masks, its values, and with [`Layout::Halves`] where
/// its high-half stream starts among them.
#[derive(Clone, Copy)]
struct Group<'a> {
    masks: &'a [u16],
    values: &'a [f32],
    high: Option<usize>,
}

impl MaskedMatrix {
    /// Packs `w: rows × cols` (row-major), or `None` when more than [`MAX_DENSITY`] of it is
    /// nonzero (or the shape does not match).
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        Self::pack_as(w, rows, cols, Layout::native())
    }

    fn pack_as(w: &[f32], rows: usize, cols: usize, layout: Layout) -> Option<Self> {
        if w.len() != rows * cols || cols == 0 {
            return None;
        }
        let nonzero = w.iter().filter(|v| **v != 0.0).count();
        if nonzero as f64 > MAX_DENSITY * w.len() as f64 {
            return None;
        }
        let groups = rows.div_ceil(GROUP);
        let mut masks = Vec::with_capacity(groups * cols);
        let mut starts = Vec::with_capacity(groups + 1);
        let mut highs = Vec::new();
        let mut values = Vec::with_capacity(nonzero);
        // Each stream's lanes, `from..to`.
        let streams: &[(usize, usize)] = match layout {
            Layout::Whole => &[(0, GROUP)],
            Layout::Halves => &[(0, HALF), (HALF, GROUP)],
        };
        for g in 0..groups {
            starts.push(values.len());
            let lanes = (rows - g * GROUP).min(GROUP);
            let at = |l: usize, i: usize| w[(g * GROUP + l) * cols + i];
            masks.extend((0..cols).map(|i| {
                (0..lanes)
                    .filter(|&l| at(l, i) != 0.0)
                    .fold(0u16, |mask, l| mask | (1 << l))
            }));
            for (s, &(from, to)) in streams.iter().enumerate() {
                if s == 1 {
                    highs.push(values.len());
                }
                for i in 0..cols {
                    let stream = from.min(lanes)..to.min(lanes);
                    values.extend(stream.map(|l| at(l, i)).filter(|v| *v != 0.0));
                }
            }
        }
        starts.push(values.len());
        Some(Self {
            rows,
            cols,
            masks,
            starts,
            highs,
            values,
            layout,
        })
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix with its zeros back, row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for g in 0..self.rows.div_ceil(GROUP) {
            let group = self.group(g);
            let mut reader = Reader::new(group);
            for (i, &mask) in group.masks.iter().enumerate() {
                for (l, w) in reader.next(mask).into_iter().enumerate() {
                    if let Some(v) = out.get_mut((g * GROUP + l) * self.cols + i) {
                        *v = w;
                    }
                }
            }
        }
        out
    }

    /// `acc[k · n + j]` = the `k`-th row of `rows` of `x: (·, cols)` dotted with output row
    /// `first + j` (`j < n`), summed as [`reference_sums`] sums.
    pub fn products(&self, first: usize, n: usize, x: &[f32], rows: &[u32], acc: &mut [f32]) {
        assert!(
            first + n <= self.rows,
            "outputs {first}+{n} of {}",
            self.rows
        );
        assert!(acc.len() >= rows.len() * n, "{} sums", acc.len());
        let xs: Vec<&[f32]> = (rows.iter())
            .map(|&r| &x[r as usize * self.cols..(r as usize + 1) * self.cols])
            .collect();
        for g in first / GROUP..(first + n).div_ceil(GROUP) {
            let group = self.group(g);
            // This group's outputs that are wanted, as lanes and as columns of `acc`.
            let lanes =
                first.max(g * GROUP) - g * GROUP..(first + n).min((g + 1) * GROUP) - g * GROUP;
            let column = g * GROUP + lanes.start - first;
            for (b, block) in xs.chunks(ROWS).enumerate() {
                let sums = group_sums(group, block);
                for (k, lane_sums) in sums.iter().take(block.len()).enumerate() {
                    let at = (b * ROWS + k) * n + column;
                    acc[at..at + lanes.len()].copy_from_slice(&lane_sums[lanes.clone()]);
                }
            }
        }
    }

    /// Group `g`.
    fn group(&self, g: usize) -> Group<'_> {
        let start = self.starts[g];
        Group {
            masks: &self.masks[g * self.cols..(g + 1) * self.cols],
            values: &self.values[start..self.starts[g + 1]],
            high: (self.layout == Layout::Halves).then(|| self.highs[g] - start),
        }
    }
}

/// Lanes of a 256-bit register: half a group.
const HALF: usize = GROUP / 2;

/// Input rows multiplied side by side.
const ROWS: usize = 4;

/// Chains of sums per row: input `i` goes to chain `i % CHAINS`, so that a multiply-add
/// waits on one four inputs back, not on the one before it.
const CHAINS: usize = 4;

/// One group's sums for up to [`ROWS`] input rows (each `masks.len()` long): `sums[k][l]` is row
/// `k` dotted with the group's output `l`.
fn group_sums(group: Group<'_>, xs: &[&[f32]]) -> [[f32; GROUP]; ROWS] {
    // SAFETY (both): the CPU has what the kernel needs; the values hold the masks' set bits in
    // the kernel's layout (as `pack` built them); every row is `masks.len()` long.
    #[cfg(target_arch = "x86_64")]
    match group.high {
        None if avx512::available() => {
            return unsafe { avx512::group_sums(group.masks, group.values, xs) };
        }
        Some(high) if avx2::available() => {
            let (low, high) = group.values.split_at(high);
            return unsafe { avx2::group_sums(group.masks, [low, high], xs) };
        }
        _ => {}
    }
    reference_sums(group, xs)
}

/// [`group_sums`] without SIMD, and the order of its sums: each row's inputs `i` in chain
/// `i % CHAINS` of fused multiply-adds, each chain in input order from zero, then
/// `(c0 + c1) + (c2 + c3)`. Every input is multiplied, zeros included, as the vector kernel
/// does.
fn reference_sums(group: Group<'_>, xs: &[&[f32]]) -> [[f32; GROUP]; ROWS] {
    let mut chains = [[[0f32; GROUP]; CHAINS]; ROWS];
    let mut reader = Reader::new(group);
    for (i, &mask) in group.masks.iter().enumerate() {
        let w = reader.next(mask);
        for (chain, x) in chains.iter_mut().zip(xs) {
            let sum = &mut chain[i % CHAINS];
            for (s, w) in sum.iter_mut().zip(w) {
                *s = w.mul_add(x[i], *s);
            }
        }
    }
    chains.map(|[c0, c1, c2, c3]| std::array::from_fn(|l| (c0[l] + c1[l]) + (c2[l] + c3[l])))
}

/// A group's inputs in order, without SIMD: where the next value of each stream is.
struct Reader<'a> {
    group: Group<'a>,
    at: [usize; 2],
}

impl<'a> Reader<'a> {
    fn new(group: Group<'a>) -> Self {
        Self {
            group,
            at: [0, group.high.unwrap_or(0)],
        }
    }

    /// The next input's sixteen weights: mask bit `l` takes the next value of lane `l`'s stream.
    fn next(&mut self, mask: u16) -> [f32; GROUP] {
        std::array::from_fn(|l| {
            if mask & (1 << l) == 0 {
                return 0.0;
            }
            let stream = usize::from(self.group.high.is_some() && l >= HALF);
            self.at[stream] += 1;
            self.group.values[self.at[stream] - 1]
        })
    }
}

/// The AVX-512 kernel of [`group_sums`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{CHAINS, GROUP, ROWS};

    /// Values asked for ahead of the ones being unpacked (4 KiB): a group's values are one
    /// stream, and the hardware prefetcher alone falls far behind it.
    const AHEAD: usize = 1024;

    /// Whether this CPU has AVX-512F and POPCNT (the standard library caches the detection).
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("popcnt")
    }

    /// One input's sixteen weights in their lanes, from `values[*at..]` (`*at` moves past
    /// them): an expanding load, which reads only the values the mask takes.
    ///
    /// # Safety
    /// AVX-512F and POPCNT; `values[*at..]` holds at least `mask.count_ones()` values.
    #[inline(always)]
    unsafe fn unpack(mask: u16, values: &[f32], at: &mut usize) -> __m512 {
        let taken = mask.count_ones() as usize;
        debug_assert!(*at + taken <= values.len());
        // SAFETY: the caller's guarantees; the load reads `taken` values.
        let w = unsafe { _mm512_maskz_expandloadu_ps(mask, values.as_ptr().add(*at)) };
        *at += taken;
        w
    }

    /// [`super::reference_sums`] for exactly `R` rows, the [`CHAINS`] chains of each row in
    /// registers.
    ///
    /// # Safety
    /// AVX-512F and POPCNT; `values` holds the masks' set bits; `xs` holds `R` rows of
    /// `masks.len()` values.
    #[target_feature(enable = "avx512f,popcnt")]
    unsafe fn sums<const R: usize>(
        masks: &[u16],
        values: &[f32],
        xs: &[&[f32]],
    ) -> [[f32; GROUP]; ROWS] {
        let cols = masks.len();
        assert!(xs.len() == R && xs.iter().all(|x| x.len() == cols));
        let x: [*const f32; R] = std::array::from_fn(|k| xs[k].as_ptr());
        let mut chains = [[_mm512_setzero_ps(); R]; CHAINS];
        let mut at = 0;
        let mut i = 0;
        while i + CHAINS <= cols {
            // Four inputs take 64 to 256 bytes, 100 at a third of the entries nonzero: asking
            // for two lines per four inputs keeps ahead of the stream.
            let ahead = values.as_ptr().wrapping_add(at + AHEAD);
            // SAFETY: a prefetch never faults; the caller's guarantees, and inputs
            // `i..i + CHAINS` are within every row.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
                let w: [__m512; CHAINS] =
                    std::array::from_fn(|c| unpack(*masks.get_unchecked(i + c), values, &mut at));
                for (c, chain) in chains.iter_mut().enumerate() {
                    for k in 0..R {
                        let x = _mm512_set1_ps(*x[k].add(i + c));
                        chain[k] = _mm512_fmadd_ps(w[c], x, chain[k]);
                    }
                }
            }
            i += CHAINS;
        }
        for (c, i) in (i..cols).enumerate() {
            // SAFETY: as above, for the last inputs.
            unsafe {
                let w = unpack(masks[i], values, &mut at);
                for k in 0..R {
                    let x = _mm512_set1_ps(*x[k].add(i));
                    chains[c][k] = _mm512_fmadd_ps(w, x, chains[c][k]);
                }
            }
        }
        let mut sums = [[0f32; GROUP]; ROWS];
        for k in 0..R {
            let [c0, c1, c2, c3] = chains.map(|chain| chain[k]);
            let sum = _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3));
            // SAFETY: sixteen floats.
            unsafe { _mm512_storeu_ps(sums[k].as_mut_ptr(), sum) };
        }
        sums
    }

    /// [`super::group_sums`] for 1 to [`ROWS`] rows.
    ///
    /// # Safety
    /// [`available`]; `values` holds the masks' set bits; `xs` holds 1 to [`ROWS`] rows of
    /// `masks.len()` values.
    pub unsafe fn group_sums(m: &[u16], v: &[f32], xs: &[&[f32]]) -> [[f32; GROUP]; ROWS] {
        // SAFETY: the caller's guarantees.
        unsafe {
            match xs.len() {
                1 => sums::<1>(m, v, xs),
                2 => sums::<2>(m, v, xs),
                3 => sums::<3>(m, v, xs),
                _ => sums::<4>(m, v, xs),
            }
        }
    }
}

/// The AVX2 kernel of [`group_sums`] for [`Layout::Halves`]: a group's sixteen lanes as two
/// halves of eight, each a pass over the group's inputs reading its own stream of values, for two
/// rows at a time (four chains of eight lanes per row fill half the sixteen registers).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{CHAINS, GROUP, HALF, ROWS};

    /// Rows of one pass.
    const PAIR: usize = 2;
    /// Values asked for ahead of the ones being unpacked (4 KiB), as the AVX-512 kernel does.
    const AHEAD: usize = 1024;

    /// Whether this CPU has AVX2, FMA and POPCNT.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("popcnt")
    }

    /// Eight 32-bit lanes, aligned for one 256-bit load.
    #[repr(C, align(32))]
    struct Lanes([i32; HALF]);

    /// For each eight-bit mask, the loaded value each lane takes: lane `l` with its bit set takes
    /// value `k`, `k` the number of set bits below `l`; a lane with its bit clear takes lane 7,
    /// which holds a zero whenever a bit is clear (fewer than eight values are loaded then).
    static SPREAD: [Lanes; 256] = spread();

    /// For each count `n` of values, the load mask of the first `n` lanes.
    static FIRST: [Lanes; HALF + 1] = first();

    const fn spread() -> [Lanes; 256] {
        let mut table = [const { Lanes([7; HALF]) }; 256];
        let mut bits = 0;
        while bits < 256 {
            let (mut lane, mut taken) = (0, 0);
            while lane < HALF {
                if bits & (1 << lane) != 0 {
                    table[bits].0[lane] = taken;
                    taken += 1;
                }
                lane += 1;
            }
            bits += 1;
        }
        table
    }

    const fn first() -> [Lanes; HALF + 1] {
        let mut table = [const { Lanes([0; HALF]) }; HALF + 1];
        let mut n = 0;
        while n <= HALF {
            let mut lane = 0;
            while lane < n {
                table[n].0[lane] = -1;
                lane += 1;
            }
            n += 1;
        }
        table
    }

    /// Eight lanes' weights from the mask bits `bits` (eight of them) and the values from `*at`
    /// on: a masked load of as many values as bits are set (the rest zero), then a permutation
    /// that spreads them to their lanes, both controls read from tables; `*at` moves past the
    /// values taken.
    ///
    /// # Safety
    /// AVX2 and POPCNT; `*at` holds `bits.count_ones()` values.
    #[inline(always)]
    unsafe fn unpack(bits: u8, at: &mut *const f32) -> __m256 {
        let taken = bits.count_ones() as usize;
        // SAFETY: the caller's guarantees; the masked load reads only the loaded lanes; the
        // tables' rows are aligned eight-lane rows, `bits` and its count index them.
        unsafe {
            let first = FIRST.get_unchecked(taken);
            let w = _mm256_maskload_ps(*at, _mm256_load_si256(first.0.as_ptr().cast()));
            *at = at.add(taken);
            let spread = SPREAD.get_unchecked(bits as usize);
            _mm256_permutevar8x32_ps(w, _mm256_load_si256(spread.0.as_ptr().cast()))
        }
    }

    /// Half `h` (lanes `8h .. 8h + 8`) of [`super::reference_sums`] for exactly `R` rows, from
    /// the half's stream `values`.
    ///
    /// # Safety
    /// [`available`]; `values` holds the set bits of half `h` of every mask; `x` holds `R` rows
    /// of `masks.len()` values.
    #[target_feature(enable = "avx2,fma,popcnt")]
    unsafe fn half_sums<const R: usize>(
        masks: &[u16],
        values: &[f32],
        x: [*const f32; R],
        h: usize,
    ) -> [__m256; R] {
        let cols = masks.len();
        // Byte `h` of each mask is half `h`'s bits (x86 is little-endian).
        let bits = |i: usize| unsafe { *masks.as_ptr().cast::<u8>().add(2 * i + h) };
        let mut chains = [[_mm256_setzero_ps(); R]; CHAINS];
        let mut at = values.as_ptr();
        let mut i = 0;
        while i + CHAINS <= cols {
            // A prefetch never faults, whatever the address.
            let ahead = at.wrapping_add(AHEAD);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
            // SAFETY: inputs `i..i + CHAINS` exist; the stream holds their set bits.
            let w: [__m256; CHAINS] =
                std::array::from_fn(|c| unsafe { unpack(bits(i + c), &mut at) });
            for (c, chain) in chains.iter_mut().enumerate() {
                for k in 0..R {
                    // SAFETY: input `i + c` is within every row.
                    let xv = _mm256_set1_ps(unsafe { *x[k].add(i + c) });
                    chain[k] = _mm256_fmadd_ps(w[c], xv, chain[k]);
                }
            }
            i += CHAINS;
        }
        for (c, i) in (i..cols).enumerate() {
            // SAFETY: as above, for the last inputs.
            let w = unsafe { unpack(bits(i), &mut at) };
            for k in 0..R {
                // SAFETY: as above, for the last inputs.
                let xv = _mm256_set1_ps(unsafe { *x[k].add(i) });
                chains[c][k] = _mm256_fmadd_ps(w, xv, chains[c][k]);
            }
        }
        std::array::from_fn(|k| {
            let [c0, c1, c2, c3] = chains.map(|chain| chain[k]);
            _mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3))
        })
    }

    /// [`super::group_sums`] for 1 to [`ROWS`] rows, two at a time, from the group's two streams.
    ///
    /// # Safety
    /// [`available`]; `streams[h]` holds the set bits of half `h` of every mask; `xs` holds 1 to
    /// [`ROWS`] rows of `masks.len()` values.
    pub unsafe fn group_sums(
        m: &[u16],
        streams: [&[f32]; 2],
        xs: &[&[f32]],
    ) -> [[f32; GROUP]; ROWS] {
        assert!(xs.len() <= ROWS && xs.iter().all(|x| x.len() == m.len()));
        let mut sums = [[0f32; GROUP]; ROWS];
        for (p, pair) in xs.chunks(PAIR).enumerate() {
            for (h, v) in streams.into_iter().enumerate() {
                // SAFETY: the caller's guarantees.
                let got: [__m256; PAIR] = unsafe {
                    if let [a, b] = pair {
                        half_sums::<2>(m, v, [a.as_ptr(), b.as_ptr()], h)
                    } else {
                        let [s] = half_sums::<1>(m, v, [pair[0].as_ptr()], h);
                        [s, s]
                    }
                };
                for (k, got) in got.iter().take(pair.len()).enumerate() {
                    let lanes = &mut sums[p * PAIR + k][HALF * h..HALF * (h + 1)];
                    // SAFETY: eight floats.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *got) };
                }
            }
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `rows × cols` matrix with about a third of its entries nonzero.
    fn sparse(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                if (i * 7919) % 3 == 0 {
                    (i as f32 * 0.37).sin()
                } else {
                    0.0
                }
            })
            .collect()
    }

    const LAYOUTS: [Layout; 2] = [Layout::Whole, Layout::Halves];

    #[test]
    fn packing_keeps_every_value_and_position() {
        for (rows, cols) in [(5, 16), (17, 37), (33, 64)] {
            let w = sparse(rows, cols);
            for layout in LAYOUTS {
                let m = MaskedMatrix::pack_as(&w, rows, cols, layout).expect("sparse enough");
                assert_eq!(m.to_dense(), w, "{rows} × {cols}, {layout:?}");
                let values = m.values.len();
                assert_eq!(values, w.iter().filter(|v| **v != 0.0).count());
                let offsets = m.starts.len() + m.highs.len();
                let packed_bytes = m.masks.len() * 2 + offsets * 8 + values * 4;
                assert!(
                    packed_bytes < w.len() * 4 * 6 / 10,
                    "{rows} × {cols}: {packed_bytes} bytes"
                );
            }
        }
        let native = MaskedMatrix::pack(&sparse(5, 16), 5, 16).expect("sparse enough");
        assert_eq!(native.layout, Layout::native());
    }

    #[test]
    fn dense_matrices_stay_dense() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
        assert!(MaskedMatrix::pack(&w, 4, 16).is_none());
        assert!(MaskedMatrix::pack(&w, 4, 15).is_none(), "shape mismatch");
    }

    /// `x_r · w_o` in f64.
    fn exact(x: &[f32], r: usize, w: &[f32], o: usize, cols: usize) -> f64 {
        (0..cols)
            .map(|i| x[r * cols + i] as f64 * w[o * cols + i] as f64)
            .sum()
    }

    /// Every product equals the order [`reference_sums`] fixes, to the bit, and the exact
    /// product within f32 rounding; a row's sums are the same alone and beside other rows
    /// (fewer than one register block holds, and more); any range of outputs, inside a group or
    /// across groups. One row of the matrix is full, one empty, the rest sparse, and the last
    /// group is short; the input count is not a multiple of the chains, so the first chains
    /// take the last inputs. Both layouts give the same bits (on this CPU, one of them through
    /// its kernel, the other through the reference).
    #[test]
    fn products_follow_one_order_whatever_the_batch() {
        let (out_dim, in_dim) = (40, 47);
        let mut w = sparse(out_dim, in_dim);
        w[..in_dim]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.5 - i as f32 * 0.01);
        w[in_dim..2 * in_dim].fill(0.0);
        let x: Vec<f32> = (0..8 * in_dim).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut results = Vec::new();
        for layout in LAYOUTS {
            let m = MaskedMatrix::pack_as(&w, out_dim, in_dim, layout).expect("sparse enough");
            let alone = |r: u32| {
                let mut y = vec![f32::NAN; out_dim];
                m.products(0, out_dim, &x, &[r], &mut y);
                y
            };
            for rows in [&[3u32, 0, 2][..], &[5], &[7, 0, 2, 6, 5, 1]] {
                for (first, n) in [(0, out_dim), (1, 13), (14, 20), (32, 8)] {
                    let mut packed = vec![f32::NAN; rows.len() * n];
                    m.products(first, n, &x, rows, &mut packed);
                    for (k, &r) in rows.iter().enumerate() {
                        let got = &packed[k * n..(k + 1) * n];
                        assert_eq!(got, &alone(r)[first..first + n], "row {r} of {rows:?}");
                        for (j, &v) in got.iter().enumerate() {
                            let want = exact(&x, r as usize, &w, first + j, in_dim);
                            assert!(
                                (v as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{v} vs {want}"
                            );
                        }
                    }
                }
            }
            let xs: Vec<&[f32]> = [6usize, 1]
                .iter()
                .map(|&r| &x[r * in_dim..(r + 1) * in_dim])
                .collect();
            for g in 0..out_dim.div_ceil(GROUP) {
                let want = reference_sums(m.group(g), &xs);
                let got = group_sums(m.group(g), &xs);
                assert_eq!(got[..2], want[..2], "group {g}, {layout:?}");
            }
            let y = alone(0);
            assert!(y[0] != 0.0 && y[1] == 0.0, "the full row and the empty one");
            assert!(y.iter().filter(|v| **v != 0.0).count() > out_dim / 2);
            results.push((0..8).map(alone).collect::<Vec<_>>());
        }
        assert_eq!(results[0], results[1], "the same bits in either layout");
    }
}
