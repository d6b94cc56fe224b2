//! Software prefetching for the kernels of a batched step that read many short streams.
//!
//! A decode step's attention reads each sequence's cached keys and values once, in pieces of a
//! few hundred bytes to a few kilobytes (a block's run of one head, one position's row). Such
//! streams end before the hardware prefetcher gets ahead of them, so a kernel that only loads
//! waits for memory at the start of each piece and draws a third of the bandwidth the machine
//! has. The kernels instead name the lines they will read next ([`Lines`]) and ask for a share of
//! them at each step of the work in hand, so the memory system always has the next piece in
//! flight while the current one is computed. (The longer streams of the packed low-rank factors,
//! packed ΔW and quantized weight kernels are asked for a fixed distance ahead, in those
//! kernels.)

/// A run of cache lines to ask for.
#[derive(Debug, Clone, Copy)]
pub struct Lines {
    start: *const u8,
    count: usize,
}

/// Bytes per cache line.
const LINE: usize = 64;

impl Lines {
    /// No lines.
    pub const NONE: Lines = Lines {
        start: std::ptr::null(),
        count: 0,
    };

    /// The lines `data` spans, from the one holding its first byte to the one holding its last.
    pub fn of<T>(data: &[T]) -> Lines {
        let start: *const u8 = data.as_ptr().cast();
        let bytes = std::mem::size_of_val(data);
        if bytes == 0 {
            return Lines::NONE;
        }
        let lead = start as usize % LINE;
        Lines {
            start: start.wrapping_sub(lead),
            count: (lead + bytes).div_ceil(LINE),
        }
    }

    /// Asks for the `part`-th of `parts` equal shares of the lines (the last share may be
    /// shorter or empty): calling it for every part in turn asks for each line once.
    #[inline(always)]
    pub fn fetch(&self, part: usize, parts: usize) {
        for line in self.share(part, parts) {
            touch(self.start.wrapping_add(line * LINE));
        }
    }

    /// The lines of the `part`-th of `parts` shares.
    #[inline(always)]
    fn share(&self, part: usize, parts: usize) -> std::ops::Range<usize> {
        let per = self.count.div_ceil(parts.max(1));
        (part * per).min(self.count)..((part + 1) * per).min(self.count)
    }

    /// Asks for every line.
    #[inline(always)]
    pub fn fetch_all(&self) {
        self.fetch(0, 1);
    }
}

/// Asks for the line holding `at` in L1. A hint: it never faults and changes no result.
#[inline(always)]
fn touch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_line_once() {
        let data = vec![0u8; 64 * 12];
        let aligned = (64 - data.as_ptr() as usize % 64) % 64;
        // Ten lines and five bytes from a line's start; one byte more from its second byte.
        let lines = Lines::of(&data[aligned..aligned + 64 * 10 + 5]);
        assert_eq!(lines.count, 11);
        assert_eq!(
            Lines::of(&data[aligned + 1..aligned + 1 + 64 * 10 + 5]).count,
            11
        );
        assert_eq!(Lines::of(&data[aligned + 60..aligned + 70]).count, 2);
        for parts in [1, 3, 4, 11, 30] {
            let mut seen = vec![0; lines.count];
            for part in 0..parts {
                lines.share(part, parts).for_each(|l| seen[l] += 1);
            }
            assert!(seen.iter().all(|&n| n == 1), "{parts} parts: {seen:?}");
        }
        // Asking never faults, in range or not.
        lines.fetch(3, 4);
        Lines::of(&data[..0]).fetch_all();
    }
}
