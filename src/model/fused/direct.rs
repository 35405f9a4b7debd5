//! Direct 3x3 convolutions (padding 1, stride 1 or 2) of narrow layers on output rows of 16 to
//! 64 values, in AVX-512 registers: each output row is one to four vectors, so the input rows
//! are read as they lie in the padded NCHW planes (strided: split into phases, see
//! [`Padding`]), with no channels-last copy, no transform and no im2col.
//!
//! At 16 channels Winograd's transforms and copies cost more than the products they save (the
//! F(4x4, 3x3) forward of the 16-channel 32x32 layers of a width-0.25 ResNet-18 ran at about a
//! quarter of the FMA peak; at 32 channels Winograd is ahead again); here every FMA does
//! useful work, and the operands come from L1: a block of output rows of a few output channels
//! stays in registers over all input channels and taps.
//!
//! With the same register blocking, [`pointwise_sample`] takes small 1x1 convolutions (the
//! downsamples of narrow models). The padded copies live here too, a vector at a time: the
//! stride-1 padding ([`pad_sample`]), the stride-2 column phases that the direct and im2col
//! paths read ([`phase_split_plane`]) and their merge back for the strided input gradient
//! ([`phase_merge_plane`]).

use super::batch_norm::flex::ChannelNorm;
use super::{Level, first_lanes, level};

/// Floats per AVX-512 vector.
pub(super) const LANES: usize = 16;
/// Output channels per register block of the forward: each tap's weights are broadcast once
/// into this many registers.
const CHANNELS: usize = 4;
/// Output channels per register block of the weight gradient: the sums of three taps (one
/// kernel row) for each.
const GRADIENT_CHANNELS: usize = 8;

/// Whether the direct kernels take a 3x3, padding-1 convolution to `cout` channels with output
/// rows of `w` values: rows of whole vectors (one to four), output channels in whole register
/// blocks (of both kernels), and AVX-512.
pub(super) fn applies(cout: usize, w: usize) -> bool {
    w.is_multiple_of(LANES)
        && (1..=4).contains(&(w / LANES))
        && cout.is_multiple_of(GRADIENT_CHANNELS)
        && level() == Level::Avx512
}

/// The weights `[C_out, C_in, kh, kw]` (`taps = kh * kw`: 9 for [`forward_sample`], 1 for
/// [`pointwise_sample`]) as those kernels read them: per block of [`CHANNELS`] output channels,
/// `[C_in, taps, CHANNELS]`.
pub(super) fn pack_weights(weights: &[f32], [cout, cin, taps]: [usize; 3]) -> Vec<f32> {
    assert_eq!(
        weights.len(),
        cout * cin * taps,
        "weights [C_out, C_in, kh, kw]"
    );
    assert_eq!(cout % CHANNELS, 0, "output channels in whole blocks");
    let mut packed = vec![0.0; weights.len()];
    for (i, value) in packed.iter_mut().enumerate() {
        let (block, ci, tap, c) = (
            i / (cin * taps * CHANNELS),
            i / (taps * CHANNELS) % cin,
            i / CHANNELS % taps,
            i % CHANNELS,
        );
        *value = weights[((block * CHANNELS + c) * cin + ci) * taps + tap];
    }
    packed
}

/// How a sample's padded input lies, as `Geometry::padded` makes it: `[C_in, rows, pitch]`,
/// each padded row's columns split into `stride` phases of `phase` values (columns `x` with `x
/// % stride == p` together, in order), so that the input under each tap at a run of output
/// columns is a contiguous run at any stride.
#[derive(Clone, Copy)]
pub(super) struct Padding {
    pub(super) stride: usize,
    pub(super) rows: usize,
    pub(super) pitch: usize,
    pub(super) phase: usize,
}

impl Padding {
    fn plane(&self) -> usize {
        self.rows * self.pitch
    }

    /// Where in a padded row the input under taps `kw = 0, 1, 2` of output column 0 lies.
    fn taps(&self) -> [usize; 3] {
        let tap = |kw: usize| kw % self.stride * self.phase + kw / self.stride;
        [tap(0), tap(1), tap(2)]
    }

    /// Asserts that `h x w` outputs read within a plane, and that `padded` holds `cin` planes.
    fn check(&self, padded: &[f32], cin: usize, [h, w]: [usize; 2]) {
        assert!(padded.len() >= cin * self.plane(), "padded input size");
        assert!((h - 1) * self.stride + 3 <= self.rows, "padded rows");
        assert!(
            self.taps().iter().all(|&t| t + w <= self.pitch),
            "padded row length"
        );
    }
}

/// One sample's output `[C_out, H, W]` from its padded input (laid out as `layout`) and the
/// [`pack_weights`] weights.
pub(super) fn forward_sample(
    padded: &[f32],
    layout: Padding,
    packed: &[f32],
    [cin, cout, h, w]: [usize; 4],
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(applies(cout, w), "direct convolution of rows of {w}");
    layout.check(padded, cin, [h, w]);
    assert_eq!(packed.len(), cout * cin * 9, "packed weights size");
    assert_eq!(out.len(), cout * h * w, "output size");
    let out = out.as_mut_ptr() as *mut f32;
    let row_step = layout.stride * layout.pitch;
    let shape = Rows {
        pitch: layout.pitch,
        row_step,
        taps: layout.taps(),
        plane: layout.plane(),
        cin,
        w,
        out_plane: h * w,
    };
    for block in 0..cout / CHANNELS {
        let weights = packed[block * cin * 9 * CHANNELS..].as_ptr();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: each call reads the padded rows under output rows `y..y + rows` of the `cin`
        // planes (within them, as checked above) and writes those output rows of this block's
        // channels, within `out`.
        unsafe {
            let out = out.add(block * CHANNELS * h * w);
            let mut y = 0;
            macro_rules! rows {
                ($v:literal, $r:literal) => {{
                    while h - y >= $r {
                        output_rows::<$v, $r>(
                            padded.as_ptr().add(y * row_step),
                            &shape,
                            weights,
                            out.add(y * w),
                        );
                        y += $r;
                    }
                }};
            }
            match w / LANES {
                1 => {
                    rows!(1, 6);
                    rows!(1, 3);
                    rows!(1, 1);
                }
                2 => {
                    rows!(2, 3);
                    rows!(2, 1);
                }
                3 => {
                    rows!(3, 2);
                    rows!(3, 1);
                }
                _ => {
                    rows!(4, 1);
                }
            }
        }
    }
}

/// Whether [`pointwise_sample`] takes a 1x1 convolution to `cout` channels of `positions`
/// outputs per channel: whole vectors of positions, output channels in whole register
/// blocks, and AVX-512.
pub(super) fn pointwise_applies(cout: usize, positions: usize) -> bool {
    positions.is_multiple_of(LANES) && cout.is_multiple_of(CHANNELS) && level() == Level::Avx512
}

/// One sample's output `[C_out, P]` of a 1x1 convolution of its input `[C_in, P]`, with the
/// [`pack_weights`] weights: per group of output-channel blocks, runs of vectors of
/// positions summed in registers over all input channels. At 16 to 64 input channels gemm's
/// packing and calls cost more than its products (a width-0.25 downsample ran at 40-70
/// GFLOP/s). Planes of one or two vectors (4x4 and 8x4 images) take several blocks at once,
/// so that 16 sums are in flight as in the longer runs.
pub(super) fn pointwise_sample(
    x: &[f32],
    packed: &[f32],
    [cin, cout, positions]: [usize; 3],
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(
        pointwise_applies(cout, positions),
        "1x1 convolution of {positions} positions"
    );
    assert_eq!(x.len(), cin * positions, "input size");
    assert_eq!(packed.len(), cout * cin, "packed weights size");
    assert_eq!(out.len(), cout * positions, "output size");
    let out = out.as_mut_ptr() as *mut f32;
    let (vectors, blocks) = (positions / LANES, cout / CHANNELS);
    // Blocks of output channels per group.
    let group = match vectors {
        1 if blocks.is_multiple_of(4) => 4,
        2 if blocks.is_multiple_of(2) => 2,
        _ => 1,
    };
    let shape = Pointwise { cin, positions };
    for first in (0..blocks).step_by(group) {
        let weights = packed[first * cin * CHANNELS..].as_ptr();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: each call reads vectors `v..v + R` of every input channel (within `x`, as
        // asserted) and writes them for this group's channels, within `out`.
        unsafe {
            let out = out.add(first * CHANNELS * positions);
            let mut v = 0;
            macro_rules! runs {
                ($r:literal, $b:literal) => {{
                    while vectors - v >= $r {
                        let at = v * LANES;
                        let input = x.as_ptr().add(at);
                        pointwise_vectors::<$r, $b>(input, &shape, weights, out.add(at));
                        v += $r;
                    }
                }};
            }
            match group {
                4 => runs!(1, 4),
                2 => runs!(2, 2),
                _ => {
                    runs!(6, 1);
                    runs!(3, 1);
                    runs!(1, 1);
                }
            }
        }
    }
}

/// Strides of a sample's input and output for [`pointwise_vectors`]: channels are `positions`
/// apart in both, blocks of packed weights `cin * CHANNELS`.
struct Pointwise {
    cin: usize,
    positions: usize,
}

/// `R` vectors of positions of `B` blocks of [`CHANNELS`] output channels, summed in
/// registers over all input channels, then stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pointwise_vectors<const R: usize, const B: usize>(
    input: *const f32,
    shape: &Pointwise,
    weights: *const f32,
    out: *mut f32,
) {
    use std::arch::x86_64::{
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    let (cin, positions) = (shape.cin, shape.positions);
    let mut sums = [[[_mm512_setzero_ps(); CHANNELS]; B]; R];
    for ci in 0..cin {
        // SAFETY (all pointer arithmetic below): within the caller's asserted sizes.
        unsafe {
            let row = input.add(ci * positions);
            let mut channel_weights = [[_mm512_setzero_ps(); CHANNELS]; B];
            for (b, weights_b) in channel_weights.iter_mut().enumerate() {
                let tap = weights.add((b * cin + ci) * CHANNELS);
                for (c, w) in weights_b.iter_mut().enumerate() {
                    *w = _mm512_set1_ps(*tap.add(c));
                }
            }
            for (r, sums) in sums.iter_mut().enumerate() {
                let x = _mm512_loadu_ps(row.add(r * LANES));
                for (sums, weights_b) in sums.iter_mut().zip(&channel_weights) {
                    for (sum, &w) in sums.iter_mut().zip(weights_b) {
                        *sum = _mm512_fmadd_ps(w, x, *sum);
                    }
                }
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        for (b, sums) in sums.iter().enumerate() {
            for (c, &sum) in sums.iter().enumerate() {
                let channel = b * CHANNELS + c;
                // SAFETY: vector `r` of output channel `channel` of the group, within `out`.
                unsafe { _mm512_storeu_ps(out.add(channel * positions + r * LANES), sum) }
            }
        }
    }
}

/// One sample `[C_in, P]` (`P` whole vectors) through `norm` into `out`, as
/// [`ChannelNorm::channel`] computes it with no residual: the input a 1x1 convolution that
/// follows a norm reads.
// `norm` goes to AVX-512 code only, which this function asserts.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(super) fn normalise_sample(
    x: &[f32],
    [cin, positions]: [usize; 2],
    norm: &ChannelNorm,
    out: &mut [f32],
) {
    assert!(
        positions.is_multiple_of(LANES) && level() == Level::Avx512,
        "planes of whole vectors"
    );
    assert_eq!(x.len(), cin * positions, "input size");
    assert_eq!(out.len(), x.len(), "output size");
    let planes = x
        .chunks_exact(positions)
        .zip(out.chunks_exact_mut(positions));
    for (c, (plane, out)) in planes.enumerate() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 is asserted above, and both planes hold `positions` values.
        unsafe {
            padded_row(plane, out, Some((norm.affine(c), norm.relu())))
        };
    }
}

/// One sample `[C_in, H, W]` as the kernels read it, `[C_in, H + 2, W + 2]` with a zero border,
/// each value through `norm` when given (as [`ChannelNorm::channel`] computes it, with no
/// residual): rows of whole vectors, copied and normalised a vector at a time (the general
/// padded copy called `memcpy` per row of 16 or 32 values, a quarter of the direct forward's
/// time).
// `affine` goes to AVX-512 code only, which this function asserts.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(super) fn pad_sample(
    x: &[f32],
    [cin, h, w]: [usize; 3],
    norm: Option<&ChannelNorm>,
    padded: &mut [f32],
) {
    assert!(
        w.is_multiple_of(LANES) && level() == Level::Avx512,
        "rows of whole vectors"
    );
    assert_eq!(x.len(), cin * h * w, "input size");
    let pitch = w + 2;
    assert_eq!(padded.len(), cin * (h + 2) * pitch, "padded size");
    for (c, (plane, out)) in x
        .chunks_exact(h * w)
        .zip(padded.chunks_exact_mut((h + 2) * pitch))
        .enumerate()
    {
        out[..pitch].fill(0.0);
        out[(h + 1) * pitch..].fill(0.0);
        let affine = norm.map(|norm| (norm.affine(c), norm.relu()));
        for (row, out) in plane
            .chunks_exact(w)
            .zip(out[pitch..].chunks_exact_mut(pitch))
        {
            out[0] = 0.0;
            out[w + 1] = 0.0;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 is asserted above, and both rows hold `w` values from where
            // they are passed.
            unsafe {
                padded_row(row, &mut out[1..=w], affine)
            };
        }
    }
}

/// `row` (whole vectors) into `out`, through `(v - mean) scale + beta` and a ReLU when
/// `affine` gives them (`([mean, scale, beta], relu)`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn padded_row(row: &[f32], out: &mut [f32], affine: Option<([f32; 3], bool)>) {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_storeu_ps};
    for (values, out) in row.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES)) {
        // SAFETY: both chunks are a whole vector.
        unsafe {
            let v = normalised(_mm512_loadu_ps(values.as_ptr()), affine);
            _mm512_storeu_ps(out.as_mut_ptr(), v);
        }
    }
}

/// `v` through `(v - mean) scale + beta` and a ReLU when `affine` gives them (`([mean, scale,
/// beta], relu)`): the same operations, in the same order, as `ChannelNorm::channel`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn normalised(
    v: std::arch::x86_64::__m512,
    affine: Option<([f32; 3], bool)>,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::{
        _CMP_LE_OQ, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_mask_mov_ps, _mm512_mul_ps,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_sub_ps,
    };
    let Some(([mean, scale, beta], relu)) = affine else {
        return v;
    };
    let y = _mm512_mul_ps(
        _mm512_sub_ps(v, _mm512_set1_ps(mean)),
        _mm512_set1_ps(scale),
    );
    let y = _mm512_add_ps(y, _mm512_set1_ps(beta));
    if !relu {
        return y;
    }
    let zero = _mm512_setzero_ps();
    _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(y, zero), zero)
}

/// Whether [`phase_split_plane`] takes planes `w` values wide: even rows, on AVX-512.
pub(super) fn splits_phases(w: usize) -> bool {
    w.is_multiple_of(2) && level() == Level::Avx512
}

/// One input plane `[H, W]` (`W` even) as a stride-2 convolution with a padding of one column
/// reads it (`Geometry::padded`'s layout): `pad_rows` zero rows above it, then each row with
/// a zero on either side split into its two column phases, `[0, x1, x3, .., x(W-1)]` and
/// `[x0, x2, .., x(W-2), 0]`, then zero rows to the end of `out`; each value through the
/// norm when `affine` gives it (as [`normalised`]). The general copy took these phases
/// value by value, with two fills per phase and row: 14-16% of a strided 3x3 layer's three
/// passes at 8x8 and 16x16.
// `affine` goes to AVX-512 code only, which this function asserts.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(super) fn phase_split_plane(
    image: &[f32],
    [h, w]: [usize; 2],
    pad_rows: usize,
    affine: Option<([f32; 3], bool)>,
    out: &mut [f32],
) {
    assert!(splits_phases(w), "rows of an even width on AVX-512");
    assert_eq!(image.len(), h * w, "plane size");
    let pitch = w + 2;
    assert!(out.len() >= (pad_rows + h) * pitch, "padded plane size");
    assert!(out.len().is_multiple_of(pitch), "whole padded rows");
    let (top, rest) = out.split_at_mut(pad_rows * pitch);
    let (rows, bottom) = rest.split_at_mut(h * pitch);
    top.fill(0.0);
    bottom.fill(0.0);
    for (row, out) in image.chunks_exact(w).zip(rows.chunks_exact_mut(pitch)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 is asserted above; `out` holds `w + 2` values for `w` in `row`.
        unsafe {
            phase_split_row(row, out, affine)
        };
    }
}

/// The inverse of [`phase_split_plane`] without a norm: the `[H, W]` image (`W` even) from
/// its padded, phase-split plane (`pad_rows` rows above it), the padding dropped. The
/// strided input gradient adds its taps into such a plane; gathered value by value, its
/// copy out was 6-9% of that gradient at 8x8 and 16x16.
pub(super) fn phase_merge_plane(
    padded: &[f32],
    [h, w]: [usize; 2],
    pad_rows: usize,
    image: &mut [f32],
) {
    assert!(splits_phases(w), "rows of an even width on AVX-512");
    assert_eq!(image.len(), h * w, "plane size");
    let pitch = w + 2;
    assert!(padded.len() >= (pad_rows + h) * pitch, "padded plane size");
    let rows = padded[pad_rows * pitch..].chunks_exact(pitch);
    for (out, row) in image.chunks_exact_mut(w).zip(rows) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 is asserted above; `row` holds `w + 2` values for `w` in `out`.
        unsafe {
            phase_merge_row(row, out)
        };
    }
}

/// One row of [`phase_merge_plane`]: `out[2k] = row[w / 2 + 1 + k]` (the second phase) and
/// `out[2k + 1] = row[1 + k]` (the first, after its padding), 32 values at a time by
/// two-vector permutes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn phase_merge_row(row: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::{
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_permutex2var_ps, _mm512_setr_epi32,
    };
    let (w, half) = (out.len(), out.len() / 2);
    let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for start in (0..w).step_by(2 * LANES) {
        let n = (w - start).min(2 * LANES);
        let (first, second) = (n.min(LANES), n.saturating_sub(LANES));
        // SAFETY: the masked loads read `n / 2` values of each phase from `start / 2`, within
        // `row`'s `w + 2`; the masked stores write `n` values of `out` from `start`.
        unsafe {
            let loaded = first_lanes(n / 2);
            let evens = _mm512_maskz_loadu_ps(loaded, row.as_ptr().add(half + 1 + start / 2));
            let odds = _mm512_maskz_loadu_ps(loaded, row.as_ptr().add(1 + start / 2));
            let at = out.as_mut_ptr().add(start);
            _mm512_mask_storeu_ps(
                at,
                first_lanes(first),
                _mm512_permutex2var_ps(evens, low, odds),
            );
            let rest = _mm512_permutex2var_ps(evens, high, odds);
            _mm512_mask_storeu_ps(at.add(LANES), first_lanes(second), rest);
        }
    }
}

/// One row of [`phase_split_plane`]: `out` (`w + 2` values) is `[0, odd values, even values,
/// 0]`, taken 32 values at a time by two-vector permutes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn phase_split_row(row: &[f32], out: &mut [f32], affine: Option<([f32; 3], bool)>) {
    use std::arch::x86_64::{
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_permutex2var_ps, _mm512_setr_epi32,
    };
    let (w, half) = (row.len(), row.len() / 2);
    out[0] = 0.0;
    out[w + 1] = 0.0;
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for start in (0..w).step_by(2 * LANES) {
        let n = (w - start).min(2 * LANES);
        let (first, second) = (n.min(LANES), n.saturating_sub(LANES));
        // SAFETY: the masked loads read `n` values of `row` from `start`, the masked stores
        // write `n / 2` values from `1 + start / 2` and from `1 + half + start / 2`, all within
        // `out`'s `w + 2`.
        unsafe {
            let input = row.as_ptr().add(start);
            let a = normalised(_mm512_maskz_loadu_ps(first_lanes(first), input), affine);
            let b = normalised(
                _mm512_maskz_loadu_ps(first_lanes(second), input.add(LANES)),
                affine,
            );
            let stored = first_lanes(n / 2);
            let at = out.as_mut_ptr().add(1 + start / 2);
            _mm512_mask_storeu_ps(at, stored, _mm512_permutex2var_ps(a, odds, b));
            _mm512_mask_storeu_ps(at.add(half), stored, _mm512_permutex2var_ps(a, evens, b));
        }
    }
}

/// Strides of a sample's padded input and output: a padded row's length, the padded rows
/// between output rows, the input under each tap within a row ([`Padding::taps`]).
struct Rows {
    pitch: usize,
    row_step: usize,
    taps: [usize; 3],
    plane: usize,
    cin: usize,
    w: usize,
    out_plane: usize,
}

/// `R` output rows of `V` vectors each, of [`CHANNELS`] output channels, summed in registers
/// over all input channels and taps, then stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_rows<const V: usize, const R: usize>(
    input: *const f32,
    shape: &Rows,
    weights: *const f32,
    out: *mut f32,
) {
    use std::arch::x86_64::{
        _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    let mut sums = [[[_mm512_setzero_ps(); CHANNELS]; V]; R];
    for ci in 0..shape.cin {
        // SAFETY (all pointer arithmetic below): within the caller's asserted sizes.
        unsafe {
            let rows = input.add(ci * shape.plane);
            let taps = weights.add(ci * 9 * CHANNELS);
            for kh in 0..3 {
                for kw in 0..3 {
                    let tap = taps.add((kh * 3 + kw) * CHANNELS);
                    let mut tap_weights = [_mm512_setzero_ps(); CHANNELS];
                    for (c, w) in tap_weights.iter_mut().enumerate() {
                        *w = _mm512_set1_ps(*tap.add(c));
                    }
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let row = rows.add(r * shape.row_step + kh * shape.pitch + shape.taps[kw]);
                        for (v, sums) in sums.iter_mut().enumerate() {
                            let x = _mm512_loadu_ps(row.add(v * LANES));
                            for (sum, &w) in sums.iter_mut().zip(&tap_weights) {
                                *sum = _mm512_fmadd_ps(w, x, *sum);
                            }
                        }
                    }
                }
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        for (v, sums) in sums.iter().enumerate() {
            for (c, &sum) in sums.iter().enumerate() {
                // SAFETY: row `r` of output channel `c` of the block, within `out`.
                unsafe {
                    _mm512_storeu_ps(out.add(c * shape.out_plane + r * shape.w + v * LANES), sum)
                }
            }
        }
    }
}

/// Adds one sample's weight gradient to `lanes` (`[C_in * 9, C_out, LANES]`: each tap and
/// output channel's sums still spread over the vector's lanes, see [`gradient_lanes_sum`]),
/// from its padded input (laid out as `layout`) and output gradient `[C_out, H, W]`.
pub(super) fn add_gradient_sample(
    padded: &[f32],
    layout: Padding,
    dy: &[f32],
    [cin, cout, h, w]: [usize; 4],
    lanes: &mut [f32],
) {
    assert!(applies(cout, w), "direct convolution of rows of {w}");
    layout.check(padded, cin, [h, w]);
    assert_eq!(dy.len(), cout * h * w, "output gradient size");
    assert_eq!(lanes.len(), cin * 9 * cout * LANES, "gradient lanes size");
    let (pitch, plane) = (layout.pitch, layout.plane());
    let shape = GradientRows {
        row_step: layout.stride * pitch,
        taps: layout.taps(),
        h,
        w,
        out_plane: h * w,
        cout,
    };
    // A block's output gradient (32 KiB at 8 channels of 32x32) stays in L1 while every
    // input channel and kernel row passes over it.
    for first in (0..cout).step_by(GRADIENT_CHANNELS) {
        for ci in 0..cin {
            for kh in 0..3 {
                let taps = (ci * 9 + kh * 3) * cout;
                #[cfg(target_arch = "x86_64")]
                // SAFETY: reads the rows under kernel row `kh` of padded plane `ci` and the output
                // gradient of channels `first..first + GRADIENT_CHANNELS` (asserted sizes, and
                // `applies` keeps the block whole); adds to the lanes of taps `(ci, kh, 0..3)`
                // of those channels.
                unsafe {
                    let x = padded.as_ptr().add(ci * plane + kh * pitch);
                    let dy = dy.as_ptr().add(first * h * w);
                    let lanes = lanes.as_mut_ptr().add((taps + first) * LANES);
                    match w / LANES {
                        1 => gradient_rows::<1>(x, dy, &shape, lanes),
                        2 => gradient_rows::<2>(x, dy, &shape, lanes),
                        3 => gradient_rows::<3>(x, dy, &shape, lanes),
                        _ => gradient_rows::<4>(x, dy, &shape, lanes),
                    }
                }
            }
        }
    }
}

/// `values` copied into `buffer` from the start of a 64-byte cache line on: the output
/// gradient as [`add_gradient_sample`] reads it fastest, each of its vectors from one line
/// rather than split over two (tensors are 16-byte aligned; alone, 1.25x that kernel's
/// speed at 16 channels of 32x32).
pub(super) fn line_aligned<'a>(values: &[f32], buffer: &'a mut Vec<f32>) -> &'a [f32] {
    const LINE_FLOATS: usize = 64 / size_of::<f32>();
    if buffer.len() < values.len() + LINE_FLOATS {
        buffer.resize(values.len() + LINE_FLOATS, 0.0);
    }
    let skip = buffer.as_ptr().align_offset(64);
    let aligned = &mut buffer[skip..][..values.len()];
    aligned.copy_from_slice(values);
    aligned
}

/// The `[C_in * 9, C_out]` sums of [`add_gradient_sample`]'s lanes, added to `sums` when
/// `accumulate`, else written there.
pub(super) fn gradient_lanes_sum(lanes: &[f32], sums: &mut [f32], accumulate: bool) {
    assert_eq!(
        lanes.len(),
        sums.len() * LANES,
        "one vector of lanes per sum"
    );
    for (sum, lanes) in sums.iter_mut().zip(lanes.chunks_exact(LANES)) {
        let total: f32 = lanes.iter().sum();
        *sum = if accumulate { *sum + total } else { total };
    }
}

/// Strides of a sample's padded input (as in [`Rows`]) and output gradient.
struct GradientRows {
    row_step: usize,
    taps: [usize; 3],
    h: usize,
    w: usize,
    out_plane: usize,
    cout: usize,
}

/// The sums over a sample's output rows of [`GRADIENT_CHANNELS`] output channels' gradient
/// times the input under taps `(kh, 0..3)` of one input channel (`x` points at its padded row
/// `kh`), lane by lane in registers, then added to their `lanes`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gradient_rows<const V: usize>(
    x: *const f32,
    dy: *const f32,
    shape: &GradientRows,
    lanes: *mut f32,
) {
    use std::arch::x86_64::{
        _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    let mut sums = [[_mm512_setzero_ps(); 3]; GRADIENT_CHANNELS];
    for y in 0..shape.h {
        for v in 0..V {
            // SAFETY (all pointer arithmetic below): within the caller's asserted sizes.
            unsafe {
                let row = x.add(y * shape.row_step + v * LANES);
                let inputs = [
                    _mm512_loadu_ps(row.add(shape.taps[0])),
                    _mm512_loadu_ps(row.add(shape.taps[1])),
                    _mm512_loadu_ps(row.add(shape.taps[2])),
                ];
                for (c, sums) in sums.iter_mut().enumerate() {
                    let grad =
                        _mm512_loadu_ps(dy.add(c * shape.out_plane + y * shape.w + v * LANES));
                    for (sum, &input) in sums.iter_mut().zip(&inputs) {
                        *sum = _mm512_fmadd_ps(grad, input, *sum);
                    }
                }
            }
        }
    }
    for (c, sums) in sums.iter().enumerate() {
        for (kw, &sum) in sums.iter().enumerate() {
            // SAFETY: the lanes of tap `(kh, kw)` and channel `c` of the block.
            unsafe {
                let at = lanes.add((kw * shape.cout + c) * LANES);
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), sum));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stride 1: `[C_in, H + 2, W + 2]`, as [`pad_sample`] makes it.
    fn unstrided([h, w]: [usize; 2]) -> Padding {
        Padding {
            stride: 1,
            rows: h + 2,
            pitch: w + 2,
            phase: w + 2,
        }
    }

    /// `[N, C, H + 2, W + 2]` copies of `[N, C, H, W]` values with a zero border.
    fn padded(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
        let mut out = vec![0.0; n * c * (h + 2) * (w + 2)];
        for (plane, values) in x.chunks_exact(h * w).enumerate() {
            for (y, row) in values.chunks_exact(w).enumerate() {
                let at = (plane * (h + 2) + y + 1) * (w + 2) + 1;
                out[at..at + w].copy_from_slice(row);
            }
        }
        out
    }

    /// The padded input at `(ci, y + kh - 1, x + kw - 1)`, zero outside the image.
    fn input(x: &[f32], [h, w]: [usize; 2], [ci, y, xx]: [usize; 3], [kh, kw]: [usize; 2]) -> f64 {
        let (y, xx) = ((y + kh) as isize - 1, (xx + kw) as isize - 1);
        if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
            return 0.0;
        }
        x[(ci * h + y as usize) * w + xx as usize] as f64
    }

    /// Sizes the kernels take: rows of one vector (blocks of 6, 3 and 1 rows: 16 is 6 + 6 + 3
    /// plus 1), of two (blocks of 3 and 1: 32 = 10 x 3 + 2 x 1), of three (blocks of 2 and 1)
    /// and of four (blocks of 1), three input channels as the stem has, and two blocks of
    /// output channels.
    const SHAPES: [[usize; 4]; 5] = [
        [5, 16, 16, 16],
        [3, 8, 32, 32],
        [2, 8, 7, 16],
        [2, 8, 5, 48],
        [3, 8, 3, 64],
    ];

    #[test]
    fn padding_borders_with_zeros_and_normalises_as_the_norm_does() {
        if level() != Level::Avx512 {
            return;
        }
        let [cin, h, w] = [3, 5, 32];
        let x = super::super::test_values(cin * h * w, 5);
        let norms = [
            None,
            Some(ChannelNorm::new(
                [&[0.1, -0.2, 0.3], &[1.0, 0.5, 2.0]],
                [&[1.5, 0.7, 1.0], &[0.2, -0.1, 0.0]],
                1e-5,
                true,
            )),
            Some(ChannelNorm::new(
                [&[0.1, -0.2, 0.3], &[1.0, 0.5, 2.0]],
                [&[1.5, 0.7, 1.0], &[0.2, -0.1, 0.0]],
                1e-5,
                false,
            )),
        ];
        for norm in &norms {
            let mut out = vec![f32::NAN; cin * (h + 2) * (w + 2)];
            pad_sample(&x, [cin, h, w], norm.as_ref(), &mut out);
            let mut expected = padded(&x, [1, cin, h, w]);
            if let Some(norm) = norm {
                for (i, value) in x.iter().enumerate() {
                    let (c, y, xx) = (i / (h * w), i / w % h, i % w);
                    expected[(c * (h + 2) + y + 1) * (w + 2) + xx + 1] =
                        norm.channel(c)(*value, 0.0);
                }
            }
            // Bit for bit, +0.0 and -0.0 alike (no NaN left from the fill).
            let bits = |v: &[f32]| v.iter().map(|v| (*v + 0.0).to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&expected), "norm {}", norm.is_some());
        }
    }

    /// Stride-2 planes: zero rows above and below, each row `[0, x1, x3, .., 0 .. x0, x2, ..,
    /// 0]` with every value through the norm, bit for bit; rows of one vector's half, of one
    /// and of several (the second vector's load and the stores masked), and rows under 2.
    /// Without a norm, merged back into the image.
    #[test]
    fn phase_split_pads_and_deinterleaves_rows_through_the_norm() {
        if !splits_phases(2) {
            return;
        }
        let norms = [
            None,
            Some(ChannelNorm::new(
                [&[0.1], &[1.0]],
                [&[1.5], &[0.2]],
                1e-5,
                true,
            )),
            Some(ChannelNorm::new(
                [&[-0.3], &[2.0]],
                [&[0.7], &[-0.1]],
                1e-5,
                false,
            )),
        ];
        for [h, w] in [
            [3, 2],
            [2, 8],
            [4, 16],
            [3, 30],
            [2, 32],
            [2, 34],
            [3, 64],
            [1, 66],
        ] {
            let x = super::super::test_values(h * w, 6);
            for norm in &norms {
                let (pad_rows, rows, pitch) = (1, h + 3, w + 2);
                let mut out = vec![f32::NAN; rows * pitch];
                let affine = norm.as_ref().map(|norm| (norm.affine(0), norm.relu()));
                phase_split_plane(&x, [h, w], pad_rows, affine, &mut out);
                let mut expected = vec![0.0; rows * pitch];
                for (y, row) in x.chunks_exact(w).enumerate() {
                    let out = &mut expected[(y + pad_rows) * pitch..][..pitch];
                    for (xx, &v) in row.iter().enumerate() {
                        let v = norm.as_ref().map_or(v, |norm| norm.channel(0)(v, 0.0));
                        // Padded column `xx + 1`: value `column / 2` of phase `column % 2`.
                        let column = xx + 1;
                        out[column % 2 * (w / 2 + 1) + column / 2] = v;
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|v| (*v + 0.0).to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&out),
                    bits(&expected),
                    "{h}x{w}, norm {}",
                    norm.is_some()
                );
                if norm.is_none() {
                    let mut merged = vec![f32::NAN; h * w];
                    phase_merge_plane(&out, [h, w], pad_rows, &mut merged);
                    assert_eq!(bits(&merged), bits(&x), "{h}x{w} merged back");
                }
            }
        }
    }

    /// 1x1 convolutions: planes of one vector (groups of four blocks, and of one where the
    /// blocks do not divide), of two (groups of two, and of one), of four (runs of 3 and 1)
    /// and of thirteen (runs of 6, 6 and 1), against the sums in f64.
    #[test]
    fn pointwise_is_the_sum_over_input_channels() {
        if !pointwise_applies(4, 16) {
            return;
        }
        for [cin, cout, positions] in [
            [5, 16, 16],
            [3, 8, 16],
            [16, 8, 32],
            [2, 4, 32],
            [7, 12, 64],
            [3, 4, 208],
        ] {
            let x = super::super::test_values(cin * positions, 7);
            let weights = super::super::test_values(cout * cin, 8);
            let packed = pack_weights(&weights, [cout, cin, 1]);
            let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); cout * positions];
            pointwise_sample(&x, &packed, [cin, cout, positions], &mut out);
            for (i, value) in out.iter().enumerate() {
                // SAFETY: `pointwise_sample` wrote it (a NaN left in place fails below).
                let value = unsafe { value.assume_init() };
                let (co, p) = (i / positions, i % positions);
                let expected: f64 = (0..cin)
                    .map(|ci| weights[co * cin + ci] as f64 * x[ci * positions + p] as f64)
                    .sum();
                assert!(
                    (value as f64 - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                    "{cin} -> {cout} over {positions}: output {i} {value} vs {expected}"
                );
            }
        }
    }

    /// Through the norm, bit for bit as `ChannelNorm::channel` computes it.
    #[test]
    fn a_sample_is_normalised_as_the_norm_does() {
        if !pointwise_applies(4, 16) {
            return;
        }
        let [cin, positions] = [3, 32];
        let x = super::super::test_values(cin * positions, 9);
        for relu in [true, false] {
            let norm = ChannelNorm::new(
                [&[0.1, -0.2, 0.3], &[1.0, 0.5, 2.0]],
                [&[1.5, 0.7, 1.0], &[0.2, -0.1, 0.0]],
                1e-5,
                relu,
            );
            let mut out = vec![f32::NAN; cin * positions];
            normalise_sample(&x, [cin, positions], &norm, &mut out);
            let expected: Vec<f32> = (0..x.len())
                .map(|i| norm.channel(i / positions)(x[i], 0.0))
                .collect();
            let bits = |v: &[f32]| v.iter().map(|v| (*v + 0.0).to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&expected), "relu {relu}");
        }
    }

    #[test]
    fn forward_is_the_convolution_sum() {
        if level() != Level::Avx512 {
            return;
        }
        for [cin, cout, h, w] in SHAPES {
            let x = super::super::test_values(cin * h * w, 1);
            let weights = super::super::test_values(cout * cin * 9, 2);
            let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); cout * h * w];
            let packed = pack_weights(&weights, [cout, cin, 9]);
            forward_sample(
                &padded(&x, [1, cin, h, w]),
                unstrided([h, w]),
                &packed,
                [cin, cout, h, w],
                &mut out,
            );
            for (i, value) in out.iter().enumerate() {
                // SAFETY: `forward_sample` wrote it (a NaN left in place fails below).
                let value = unsafe { value.assume_init() };
                let (co, y, xx) = (i / (h * w), i / w % h, i % w);
                let mut expected = 0.0;
                for ci in 0..cin {
                    for tap in 0..9 {
                        let at = [ci, y, xx];
                        let weight = weights[(co * cin + ci) * 9 + tap] as f64;
                        expected += weight * input(&x, [h, w], at, [tap / 3, tap % 3]);
                    }
                }
                assert!(
                    (value as f64 - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                    "{cin} -> {cout} at {h}x{w}: output {i} {value} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn gradient_is_the_sum_over_samples_and_positions() {
        if level() != Level::Avx512 {
            return;
        }
        for [cin, cout, h, w] in SHAPES {
            let n = 2;
            let x = super::super::test_values(n * cin * h * w, 3);
            let dy = super::super::test_values(n * cout * h * w, 4);
            let padded = padded(&x, [n, cin, h, w]);
            let mut lanes = vec![0.0; cin * 9 * cout * LANES];
            let (image, grads) = (cin * (h + 2) * (w + 2), cout * h * w);
            for s in 0..n {
                let (padded, dy) = (&padded[s * image..][..image], &dy[s * grads..][..grads]);
                let layout = unstrided([h, w]);
                add_gradient_sample(padded, layout, dy, [cin, cout, h, w], &mut lanes);
            }
            // Written, then added to: twice the sums.
            let mut sums = vec![f32::NAN; cin * 9 * cout];
            gradient_lanes_sum(&lanes, &mut sums, false);
            gradient_lanes_sum(&lanes, &mut sums, true);
            for (i, &value) in sums.iter().enumerate() {
                let (ci, tap, co) = (i / (9 * cout), i / cout % 9, i % cout);
                let mut expected = 0.0;
                for s in 0..n {
                    let x = &x[s * cin * h * w..];
                    for p in 0..h * w {
                        let d = dy[s * grads + co * h * w + p] as f64;
                        expected += d * input(x, [h, w], [ci, p / w, p % w], [tap / 3, tap % 3]);
                    }
                }
                let expected = 2.0 * expected;
                assert!(
                    (value as f64 - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                    "{cin} -> {cout} at {h}x{w}: tap {tap} of {ci} -> {co}: {value} vs {expected}"
                );
            }
        }
    }
}
