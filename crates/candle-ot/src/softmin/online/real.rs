//! The scalar types of the CPU kernels (f32, f64) and a vectorisable exponential.
//!
//! `exp` of libm is a function call that LLVM cannot vectorise. [`Real::exp_le0`] is a
//! branch-free Cody–Waite range reduction followed by a polynomial, written with plain
//! arithmetic and integer bit manipulation only, so that the loops calling it vectorise
//! (SSE2 / AVX2 / AVX-512 / NEON).
//!
//! Accuracy (measured by the unit tests below against `std`, over `[-80, 0]` for f32 and
//! `[-700, 0]` for f64): f32 within 2 ulp, f64 within 4 ulp. Arguments below the underflow
//! threshold (−87.3 for f32, −708.3 for f64), including −∞, give exactly 0.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

/// A floating-point type the CPU kernels compute in.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    fn exp(self) -> Self;
    /// `max` that vectorises (no NaN special-casing: inputs are validated finite or −∞).
    #[inline(always)]
    fn fmax(self, o: Self) -> Self {
        if self > o {
            self
        } else {
            o
        }
    }
    /// exp(x) for x ≤ ~0 (valid up to the overflow threshold), vectorisable.
    fn exp_le0(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn exp_le0(self) -> Self {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        // Cody–Waite split of ln 2 (Cephes).
        const C1: f32 = 0.693_359_4;
        const C2: f32 = -2.121_944_4e-4;
        const LO: f32 = -87.336_55;
        const HI: f32 = 88.0;
        // 1.5 * 2^23: adding it rounds to the nearest integer, whose value sits in the low
        // mantissa bits.
        const MAGIC: f32 = 12_582_912.0;
        let underflow = self < LO;
        let x = if self > HI { HI } else { self };
        let x = if x < LO { LO } else { x };
        let t = x * LOG2E + MAGIC;
        let n = t - MAGIC;
        let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
        let r = x - n * C1 - n * C2;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 1.666_666_5e-1;
        p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        let scale = f32::from_bits(((ni + 127) as u32) << 23);
        if underflow {
            0.0
        } else {
            y * scale
        }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp_le0(self) -> Self {
        const LOG2E: f64 = std::f64::consts::LOG2_E;
        const C1: f64 = 6.931_457_519_531_25e-1;
        const C2: f64 = 1.428_606_820_309_417_3e-6;
        const LO: f64 = -708.39;
        const HI: f64 = 709.0;
        // 1.5 * 2^52.
        const MAGIC: f64 = 6_755_399_441_055_744.0;
        let underflow = self < LO;
        let x = if self > HI { HI } else { self };
        let x = if x < LO { LO } else { x };
        let t = x * LOG2E + MAGIC;
        let n = t - MAGIC;
        let ni = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
        let r = x - n * C1 - n * C2;
        // Taylor polynomial of degree 13 on |r| ≤ ln2/2: truncation error < 1e-17.
        const INV_FACT: [f64; 14] = [
            1.0,
            1.0,
            0.5,
            1.0 / 6.0,
            1.0 / 24.0,
            1.0 / 120.0,
            1.0 / 720.0,
            1.0 / 5040.0,
            1.0 / 40320.0,
            1.0 / 362880.0,
            1.0 / 3628800.0,
            1.0 / 39916800.0,
            1.0 / 479001600.0,
            1.0 / 6227020800.0,
        ];
        let mut p = INV_FACT[13];
        let mut k = 12;
        loop {
            p = p * r + INV_FACT[k];
            if k == 0 {
                break;
            }
            k -= 1;
        }
        let scale = f64::from_bits(((ni + 1023) as u64) << 52);
        if underflow {
            0.0
        } else {
            p * scale
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Real;

    fn ulp_err_f32(got: f32, want: f32) -> f64 {
        ((got as f64 - want as f64) / (f32::EPSILON as f64 * want.abs() as f64)).abs()
    }

    #[test]
    fn exp_f32_accuracy() {
        let mut worst = 0.0f64;
        for k in 0..=200_000 {
            let x = -80.0f32 * k as f32 / 200_000.0;
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulp_err_f32(x.exp_le0(), want));
        }
        assert!(worst <= 2.0, "f32 exp worst error {worst} ulp");
        assert_eq!(f32::NEG_INFINITY.exp_le0(), 0.0);
        assert_eq!((-100.0f32).exp_le0(), 0.0);
        assert_eq!(0.0f32.exp_le0(), 1.0);
    }

    #[test]
    fn exp_f64_accuracy() {
        let mut worst = 0.0f64;
        for k in 0..=200_000 {
            let x = -700.0 * k as f64 / 200_000.0;
            let want = x.exp();
            let err = ((x.exp_le0() - want) / (f64::EPSILON * want)).abs();
            worst = worst.max(err);
        }
        assert!(worst <= 4.0, "f64 exp worst error {worst} ulp");
        assert_eq!(f64::NEG_INFINITY.exp_le0(), 0.0);
        assert_eq!(0.0f64.exp_le0(), 1.0);
    }
}
