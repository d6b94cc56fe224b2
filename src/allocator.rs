//! The process allocator's free pages.
//!
//! The `knots` binary allocates with mimalloc (`src/main.rs`), which keeps freed pages for reuse
//! so that repeated merges and serving steps do not fault fresh pages in. It returns them to the
//! operating system only as later allocations come by, so memory freed by a one-off burst
//! stays resident while the server idles: loading SmolLM2 left 65 MB of freed read and packing
//! buffers resident (260 MB in all, 200 MB once returned).

/// Hands back to the operating system the pages mimalloc holds free, those of the calling
/// thread's heap and those abandoned by finished threads. For the end of one-off work, such as
/// loading models, whose buffers are not needed again; harmless when mimalloc is not the
/// allocator (its heaps are then empty).
pub fn return_free_pages() {
    // SAFETY: `mi_collect` takes no pointers; it only walks mimalloc's own heaps.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
