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
//!
//! [`Real::exp2_le0`] is the cheaper base-2 exponential of the hot loops (for f32, 10 vector
//! operations plus the final product, against about 22): rounding to the nearest integer n
//! with the `1.5·2^p + bias` trick (whose bits, shifted, are already the exponent field of
//! 2^n), `r = x − n ∈ [−½, ½]` exactly,
//! and a minimax polynomial for 2^r (degree 5 for f32, relative error 7.5e-8; degree 11 for
//! f64, 5.9e-18; coefficients from a Remez exchange on relative error). Underflow costs one
//! `max`: the argument is clamped at −127 (f32) / −1023 (f64), where the exponent field is 0
//! and the scale 2^n is +0 exactly, so −∞ gives exactly 0. Measured over [−126, 0] /
//! [−1020, 0]: f32 and f64 within 2 ulp of `std`'s `exp2` (unit tests below).
//! The ulp here is `EPSILON` relative to the exact value.

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
    /// Fused multiply-add `self · a + b` (one rounding; a libm call unless FMA is available).
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn to_f64(self) -> f64;
    /// 2^x for x ≤ 0 as `(p, s)` with `2^x = p·s`, `p ∈ [0.7, 1.5)` and `s` a power of two or
    /// +0 (so that the product is exact outside the subnormal range, and callers may fuse it
    /// into an accumulation). Vectorisable; `s = 0` below the underflow clamp and for −∞.
    /// `F`: use fused multiply-adds (only where the instruction exists, see [`fma`]).
    fn exp2_split<const F: bool>(self) -> (Self, Self);
    /// 2^x for x ≤ 0, vectorisable; exactly 0 below the underflow clamp (and for −∞).
    #[inline(always)]
    fn exp2_le0<const F: bool>(self) -> Self {
        let (p, s) = self.exp2_split::<F>();
        p * s
    }
}

/// `a · b + c`: one fused instruction when `F` (callers set it inside functions compiled with
/// the FMA feature, or on targets that always have it), a multiply and an add otherwise, so
/// that the portable build never calls libm's `fma`.
#[inline(always)]
pub(crate) fn fma<T: Real, const F: bool>(a: T, b: T, c: T) -> T {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Whether the portable build of the kernels may use fused multiply-adds (aarch64 always has
/// them; x86-64 only with a global `-C target-feature=+fma`).
pub(crate) const PORTABLE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// Minimax coefficients (c₀ … c₅) of 2^r on [−½, ½], relative error 7.5e-8 (Remez exchange on
/// the relative error; evaluated in f32 the exponential is within 2 ulp).
#[allow(clippy::excessive_precision)]
const EXP2_F32: [f32; 6] = [
    1.000_000_071_654_714_1,
    0.693_146_967_065_035_2,
    0.240_221_197_237_107_2,
    0.055_507_132_718_556_45,
    0.009_675_541_343_121_34,
    0.001_327_647_263_195_033,
];

/// Minimax coefficients (c₀ … c₁₁) of 2^r on [−½, ½], relative error 5.9e-18.
#[allow(clippy::excessive_precision)]
const EXP2_F64: [f64; 12] = [
    0.999_999_999_999_999_996_780_1,
    0.693_147_180_559_945_348_824_2,
    0.240_226_506_959_101_640_568_3,
    0.055_504_108_664_818_356_169_88,
    0.009_618_129_107_585_429_993,
    0.001_333_355_814_717_627_035,
    1.540_353_046_546_327_548e-4,
    1.525_273_311_504_172_196e-5,
    1.321_543_199_249_106_101e-6,
    1.017_835_368_425_266_156e-7,
    7.074_238_242_763_149_274e-9,
    4.412_098_374_127_279_052e-10,
];

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
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp2_split<const F: bool>(self) -> (Self, Self) {
        // 1.5·2^23 + 127: adding it rounds x to the nearest integer n, and leaves n + 127 in
        // the low mantissa bits, so that `bits << 23` is the bit pattern of 2^n.
        const MAGIC: f32 = 12_583_039.0;
        let x = self.fmax(-127.0);
        let t = x + MAGIC;
        let r = x - (t - MAGIC);
        let c = &EXP2_F32;
        let mut p = c[5];
        for k in (0..5).rev() {
            p = fma::<f32, F>(p, r, c[k]);
        }
        (p, f32::from_bits(t.to_bits() << 23))
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
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp2_split<const F: bool>(self) -> (Self, Self) {
        // 1.5·2^52 + 1023, see the f32 version.
        const MAGIC: f64 = 6_755_399_441_056_767.0;
        let x = self.fmax(-1023.0);
        let t = x + MAGIC;
        let r = x - (t - MAGIC);
        let c = &EXP2_F64;
        let mut p = c[11];
        for k in (0..11).rev() {
            p = fma::<f64, F>(p, r, c[k]);
        }
        (p, f64::from_bits(t.to_bits() << 52))
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

    fn exp2_f32_worst<const F: bool>() -> f64 {
        let mut worst = 0.0f64;
        for k in 0..=400_000 {
            let x = -126.0f32 * k as f32 / 400_000.0;
            let want = (x as f64).exp2();
            let got = x.exp2_le0::<F>() as f64;
            worst = worst.max(((got - want) / (f32::EPSILON as f64 * want)).abs());
        }
        worst
    }

    #[test]
    fn exp2_f32_accuracy() {
        for worst in [exp2_f32_worst::<false>(), exp2_f32_worst::<true>()] {
            assert!(worst <= 2.0, "f32 exp2 worst error {worst} ulp");
        }
        assert_eq!(f32::NEG_INFINITY.exp2_le0::<false>(), 0.0);
        assert_eq!((-127.0f32).exp2_le0::<false>(), 0.0);
        assert_eq!((-1000.0f32).exp2_le0::<true>(), 0.0);
        // c₀ rounds to 1 + 1 ulp: 2^n is within 1 ulp (callers that need an exact 1 test for it).
        assert!(((-3.0f32).exp2_le0::<false>() - 0.125).abs() <= 0.125 * f32::EPSILON);
    }

    #[test]
    fn exp2_f64_accuracy() {
        let mut worst = 0.0f64;
        for k in 0..=400_000 {
            let x = -1020.0 * k as f64 / 400_000.0;
            let want = x.exp2();
            for got in [x.exp2_le0::<false>(), x.exp2_le0::<true>()] {
                worst = worst.max(((got - want) / (f64::EPSILON * want)).abs());
            }
        }
        assert!(worst <= 2.0, "f64 exp2 worst error {worst} ulp");
        assert_eq!(f64::NEG_INFINITY.exp2_le0::<true>(), 0.0);
        assert_eq!((-1023.0f64).exp2_le0::<false>(), 0.0);
        assert_eq!(0.0f64.exp2_le0::<true>(), 1.0);
    }
}
