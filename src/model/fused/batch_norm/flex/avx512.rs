//! The backward's per-channel gradient sums and each sample's statistics sums in AVX-512
//! registers.

use super::Relu;
use std::arch::x86_64::*;

/// As `super::sample_sums` for runs of whole vectors: 16 lanes of each sum, added up
/// once per run. The general loop's eight accumulators and scalar tail cost about
/// three cycles a value on the runs of 16 and 64 of 4x4 and 8x8 images (5 GB/s).
#[target_feature(enable = "avx512f")]
pub(super) fn sample_sums(sample: &[f32], spatial: usize, out: &mut [[f32; 3]]) {
    for (sums, run) in out.iter_mut().zip(sample.chunks_exact(spatial)) {
        let k = run[0];
        let first = _mm512_set1_ps(k);
        let (mut sum, mut squares) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for chunk in run.as_chunks::<16>().0 {
            // SAFETY: a whole vector.
            let v = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
            let d = _mm512_sub_ps(v, first);
            sum = _mm512_add_ps(sum, d);
            squares = _mm512_add_ps(squares, _mm512_mul_ps(d, d));
        }
        *sums = [k, _mm512_reduce_add_ps(sum), _mm512_reduce_add_ps(squares)];
    }
}

/// Where the gradient passes: everywhere, where a kept output is positive (or NaN), or
/// where `(x - m) k + b` is (the norm's output computed again, `[m, k, b]`).
pub(super) enum Mask<'a> {
    None,
    Output(&'a [f32]),
    Input([f32; 3]),
}

impl<'a> Mask<'a> {
    /// `relu`'s mask for run `at..at + len` of channel `ch`.
    pub(super) fn of(relu: &Relu<'a>, [ch, at]: [usize; 2], len: usize) -> Self {
        match relu {
            Relu::None => Mask::None,
            Relu::Output(ys) => Mask::Output(&ys[at..][..len]),
            Relu::Input(norm) => Mask::Input(norm.affine(ch)),
        }
    }
}

/// As `super::gradient_sums`, 16 lanes at a time (the last chunk's loads masked to
/// what is left, its other lanes zero), one horizontal sum of each at the end.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gradient_sums(xs: &[f32], dy: &[f32], mask: Mask, mean: f32) -> [f32; 2] {
    assert_eq!(xs.len(), dy.len());
    if let Mask::Output(ys) = &mask {
        assert_eq!(ys.len(), dy.len());
    }
    let (mean_v, zero) = (_mm512_set1_ps(mean), _mm512_setzero_ps());
    let (mut sum, mut centred) = (zero, zero);
    for at in (0..xs.len()).step_by(16) {
        let left = (xs.len() - at).min(16);
        let lanes = super::super::super::first_lanes(left);
        // SAFETY: the mask keeps every load inside the runs (equal lengths, asserted).
        unsafe {
            let x = _mm512_maskz_loadu_ps(lanes, xs.as_ptr().add(at));
            let g = _mm512_maskz_loadu_ps(lanes, dy.as_ptr().add(at));
            // `!(y <= 0)`: positive or NaN, as `through_relu` and `ChannelNorm` decide.
            let passes = match &mask {
                Mask::None => lanes,
                Mask::Output(ys) => {
                    let y = _mm512_maskz_loadu_ps(lanes, ys.as_ptr().add(at));
                    _mm512_mask_cmp_ps_mask::<_CMP_NLE_UQ>(lanes, y, zero)
                }
                Mask::Input([m, k, b]) => {
                    let centred = _mm512_sub_ps(x, _mm512_set1_ps(*m));
                    let scaled = _mm512_mul_ps(centred, _mm512_set1_ps(*k));
                    let y = _mm512_add_ps(scaled, _mm512_set1_ps(*b));
                    _mm512_mask_cmp_ps_mask::<_CMP_NLE_UQ>(lanes, y, zero)
                }
            };
            let g = _mm512_maskz_mov_ps(passes, g);
            sum = _mm512_add_ps(sum, g);
            let d = _mm512_mul_ps(_mm512_sub_ps(x, mean_v), g);
            centred = _mm512_add_ps(centred, d);
        }
    }
    [_mm512_reduce_add_ps(sum), _mm512_reduce_add_ps(centred)]
}
