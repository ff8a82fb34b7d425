//! `pow` and `exp`, defined here so that the binaries do not load `libm.so.6`.
//!
//! The only functions the agent and the waypoint take from glibc's libm are `pow` (`f64::powf`,
//! in tokio's scheduler: the moving average of task poll times) and `exp` (`f64::exp`, in
//! hickory's resolver: the decay of a name server's smoothed round-trip time, for the
//! waypoint's `ServiceEntries` of resolution DNS). Loading libm for them cost about
//! half a megabyte of resident memory in every process: the loader resolves all of libm's
//! indirect functions (its variants by CPU feature) at start, which maps its code and tables
//! page by page. With both defined in the binary, the linker finds no use of libm and drops it
//! (rustc links with `--as-needed`); `cargo xtask bench` shows the mappings left.
//!
//! The `libm` crate is musl's libm ported to Rust (the one `compiler-builtins` ships for targets
//! without a C library): the same algorithm as glibc's, within one unit in the last place.

/// C's `pow(x, y)`: `x` raised to the power `y`.
// The symbol must keep its C name: it stands in for libm's (`unsafe_code`: an unmangled
// symbol can clash at link time, which is the point here: no other definition is linked).
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// C's `exp(x)`: e raised to the power `x`.
// As `pow` above: it stands in for libm's.
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn exp(x: f64) -> f64 {
    libm::exp(x)
}

#[cfg(test)]
mod tests {
    use super::{exp, pow};

    #[test]
    fn exp_agrees_with_the_cases_hickory_uses() {
        // hickory: `exp(-elapsed / decay)`, over a name server's round trips.
        for x in [0.0, -0.001, -0.5, -1.0, -3.0, -20.0, 1.0] {
            let want = std::f64::consts::E.powf(x);
            let got = exp(x);
            assert!((got - want).abs() <= want * 1e-12, "e^{x}: {got} vs {want}");
        }
        assert!(exp(f64::NAN).is_nan());
        assert_eq!(exp(f64::NEG_INFINITY).to_bits(), 0.0_f64.to_bits());
    }

    #[test]
    fn pow_agrees_with_the_cases_tokio_uses() {
        // tokio: `1.0 - (1.0 - alpha).powf(polls)`, alpha 0.1, polls counted per batch.
        for polls in [0, 1, 2, 17, 61, 1000] {
            let want = 0.9_f64.powi(polls);
            let got = pow(0.9, f64::from(polls));
            assert!(
                (got - want).abs() <= want * 1e-12,
                "0.9^{polls}: {got} vs {want}"
            );
        }
    }

    // Exact: these results are exact in binary floating point, and C's `pow` returns them so.
    #[allow(clippy::float_cmp)]
    #[test]
    fn pow_is_exact_where_c_says_it_is() {
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(2.0, -1.0), 0.5);
        assert_eq!(pow(0.0, 0.0), 1.0);
        assert_eq!(pow(f64::NAN, 0.0), 1.0);
        assert_eq!(pow(-8.0, 3.0), -512.0);
        assert!(pow(-1.0, 0.5).is_nan());
        assert_eq!(pow(0.0, -1.0), f64::INFINITY);
    }
}
