//! Hot loops compiled for AVX-512 and AVX2 as well as for baseline x86-64, chosen at run time:
//! the crate targets baseline x86-64 so one binary runs on every x86-64 CPU.

/// Defines a function whose body is compiled three times, for baseline x86-64, for AVX2 and for
/// AVX-512, and runs the widest copy this CPU has, so the loops in the body (and the
/// `#[inline(always)]` helpers it calls) use 256- or 512-bit vectors while the crate itself
/// targets baseline x86-64. Results are the same either way: the kernels fix their summation
/// order and no multiply-add is fused. Write the body with plain loops and `#[inline(always)]` helpers: a
/// closure is a function of its own, compiled for the baseline unless the compiler inlines it.
macro_rules! wide_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, the only feature `avx512` is compiled for.
                return unsafe { avx512($($arg),*) };
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA, the features `avx2` is compiled for.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide_fn;
