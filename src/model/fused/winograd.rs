//! Winograd's minimal filtering (Lavin and Gray 2016) for the f32 convolutions of 3x3 kernels
//! at stride 1 with padding 1, most of a ResNet's FLOPs.
//!
//! The forward (and the input gradient, a convolution too) takes F(4x4, 3x3): each 4x4 block of
//! outputs comes from a 6x6 input patch with 36 multiplications per input channel instead of
//! 144, as 36 GEMMs (one per point of the transformed 6x6 tile) over all the tiles:
//!
//! `Y = A^T [ (G g G^T) (.) (B^T d B) ] A`, with
//! `B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]`,
//! `G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]` and
//! `A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]`. Its transforms scale by up
//! to 8, so in f32 the result is some ten units in the last place of the largest terms away from
//! the direct sum (F(2x2, 3x3), 16 multiplications for 4 outputs, is exact to a few; the step
//! measured 1.04x faster with F(4x4, 3x3) at width 1, and at width 0.25, where F(2x2, 3x3) did
//! not pay, 1.07x faster than without Winograd). Outputs that are not a multiple of 4 take whole
//! tiles over zero padding and drop what lies outside.
//!
//! The weight gradient takes F(3x3, 2x2) over 2x2 output tiles (even outputs only): `dW = G^T
//! [ sum over tiles of (A e A^T) (.) (B^T d B) ] G` with `d` a 4x4 input patch, `e` a 2x2 tile
//! of the output gradient, `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `A^T = [1 1 1 0; 0
//! 1 -1 -1]` and `G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]` ([`gradient_input`],
//! [`gradient_output_grad`]): its transforms only add and halve.
//!
//! Layouts, channels innermost so that every transform works on whole runs of channels,
//! whatever the image size: padded input `[count, hp, wp, C_in]`, transformed weights `[C_in,
//! 36, C_out]`. The forward's transformed inputs `[tiles, 36, C_in]` and products `[tiles, 36,
//! C_out]` keep each tile's 36 points together, so that a tile's transform reads or writes one
//! contiguous run (point by point, 36 streams of lines not in L1 bound the transforms: the
//! 16-channel forward 1.08x); the weight gradient's are point by point (`[points, tiles, C]`,
//! each point [`point_stride`] apart). The GEMM of point `p` is `[C_out, C_in] x [C_in,
//! tiles]`: its `lhs` (weights) has `C_out` contiguous and its `rhs` has `k = C_in`
//! contiguous, as gemm reads them best. For 16 or 32 channels on AVX-512 kernels of ours in
//! registers take gemm's place ([`point_products`], [`gradient_products`]).

use std::mem::MaybeUninit;

/// Outputs a side of the forward's tiles.
pub(super) const TILE: usize = 4;

/// Points of the forward's transformed 6x6 tile.
pub(super) const POINTS: usize = 36;

/// Outputs a side of the weight gradient's tiles.
pub(super) const GRADIENT_TILE: usize = 2;

/// Points of the weight gradient's transformed 4x4 tile.
pub(super) const GRADIENT_POINTS: usize = 16;

/// Floats from one point's transformed tiles (or products) to the next's: the `len` values
/// of one point and a cache line more, so that the points' streams, which the transforms
/// read or write side by side, do not fall into the same L1 set (a power-of-two stride put
/// all 16 into one 12-way set).
pub(super) fn point_stride(len: usize) -> usize {
    len + LANES
}

/// Values per block of the 16 x 16 transposes between layouts (and of [`load`] and
/// [`store`]): one AVX-512 register of f32.
pub(super) const LANES: usize = 16;

/// Whether the forward computes this convolution: a 3x3 kernel at stride 1, padding 1 (the
/// output the size of the input).
pub(super) fn applies([kh, kw]: [usize; 2], stride: [usize; 2], pad: [usize; 2]) -> bool {
    [kh, kw] == [3, 3] && stride == [1, 1] && pad == [1, 1]
}

/// Whether the weight gradient computes it too: whole 2x2 tiles cover an even output.
pub(super) fn gradient_applies(
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    out: [usize; 2],
) -> bool {
    applies(kernel, stride, pad) && out.iter().all(|&o| o >= 2 && o % 2 == 0)
}

/// `[C_out, C_in, 3, 3]` kernels as `G g G^T`, `[C_in, 36, C_out]`: input channels in
/// parallel, each one's 36 points a contiguous block (the GEMM of point `p` reads its
/// `[C_out, C_in]` with `C_out` contiguous and input channels `36 C_out` apart). A vector of
/// output channels at a time, so that each point's values are stored as a run; into
/// uninitialised memory (4x the weights, every call: a zero-fill first would be a pass as long).
pub(super) fn transform_weights(weights: &[f32], [cout, cin]: [usize; 2]) -> Vec<f32> {
    assert_eq!(weights.len(), cout * cin * 9, "3x3 kernels");
    // SAFETY: run `ci` stores every output channel's value of each of its 36 points.
    unsafe {
        super::written_by_runs(cin * POINTS * cout, POINTS * cout, |ci, points| {
            for co0 in (0..cout).step_by(LANES) {
                let nc = LANES.min(cout - co0);
                // `g[3 i + j][l]`: tap `(i, j)` of output channel `co0 + l`.
                let mut g = [[0.0f32; LANES]; 9];
                for l in 0..nc {
                    let kernel = &weights[((co0 + l) * cin + ci) * 9..][..9];
                    for (tap, &value) in kernel.iter().enumerate() {
                        g[tap][l] = value;
                    }
                }
                let mut u = [[0.0f32; LANES]; POINTS];
                for l in 0..LANES {
                    // `columns[j][i]` is `(G g)[i][j]`.
                    let column = |j: usize| g_times([g[j][l], g[3 + j][l], g[6 + j][l]]);
                    let columns = [column(0), column(1), column(2)];
                    for i in 0..6 {
                        let row = g_times([columns[0][i], columns[1][i], columns[2][i]]);
                        for (j, value) in row.into_iter().enumerate() {
                            u[6 * i + j][l] = value;
                        }
                    }
                }
                for (p, values) in u.iter().enumerate() {
                    store_slots(&mut points[p * cout + co0..], values, nc);
                }
            }
        })
    }
}

/// `G v` of F(4x4, 3x3), by multiplications (a division by 6 or 24 costs ten times as much).
#[inline(always)]
fn g_times([a, b, c]: [f32; 3]) -> [f32; 6] {
    const SIXTH: f32 = 1.0 / 6.0;
    let (even, odd) = (a * (SIXTH / 4.0) + c * SIXTH, b * (SIXTH / 2.0));
    [
        a * 0.25,
        -(a + b + c) * SIXTH,
        -(a - b + c) * SIXTH,
        even + odd,
        even - odd,
        c,
    ]
}

/// `B^T v` of F(4x4, 3x3) (and in AVX-512 registers, [`avx512::bt_times`]).
#[inline(always)]
fn bt_times([v0, v1, v2, v3, v4, v5]: [f32; 6]) -> [f32; 6] {
    let (sum, diff) = (v4 - 4.0 * v2, v3 - 4.0 * v1);
    let (sum2, diff2) = (v4 - v2, 2.0 * (v3 - v1));
    [
        4.0 * v0 - 5.0 * v2 + v4,
        sum + diff,
        sum - diff,
        sum2 + diff2,
        sum2 - diff2,
        4.0 * v1 - 5.0 * v3 + v5,
    ]
}

/// `A^T v` of F(4x4, 3x3) (and in AVX-512 registers, [`avx512::at_times`]).
#[inline(always)]
fn at_times([v0, v1, v2, v3, v4, v5]: [f32; 6]) -> [f32; 4] {
    let (sum, diff) = (v1 + v2, v1 - v2);
    let (sum2, diff2) = (v3 + v4, v3 - v4);
    [
        v0 + sum + sum2,
        diff + 2.0 * diff2,
        sum + 4.0 * sum2,
        diff + 8.0 * diff2 + v5,
    ]
}

/// Whether a convolution of `C_in` to `C_out` channels is narrow, both 16 or 32, on a CPU
/// with AVX-512: its products then run on kernels of ours in registers ([`point_products`],
/// [`gradient_products`]) rather than gemm's, and its forward tiles lie [`Layout::TileMajor`].
pub(super) fn narrow_in_registers(cin: usize, cout: usize) -> bool {
    narrow(cin) && narrow(cout)
}

/// Whether `c` channels, 16 or 32, are narrow on this CPU (AVX-512).
fn narrow(c: usize) -> bool {
    c.is_multiple_of(LANES) && c <= 2 * LANES && super::level() == super::Level::Avx512
}

/// How the forward lays out a block's transformed tiles and products, and so how it
/// computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Layout {
    /// `[36, tiles, C]`, each point [`point_stride`] apart: transforms lane by lane (the
    /// compiler's vectors), gemm's products.
    PointMajor,
    /// `[tiles, 36, C]`, each tile's points contiguous: transforms in AVX-512 registers
    /// ([`avx512`]) and the products by [`point_products`].
    TileMajor,
}

impl Layout {
    /// For a convolution of `C_in` to `C_out` channels: tile-major on AVX-512 for the narrow
    /// layers, both channel counts 16 or 32. There a tile's transform reads or writes one
    /// contiguous run instead of a line in each of 36 streams, and gemm's 16 x 6 kernel, its
    /// packing and per-call work cost more than the products (per tile of 16 channels 160-170
    /// against 250 ns, of 32 channels 490 against 520): the 16-channel forward 1.08x. From 64
    /// channels gemm's blocking of the weights is ahead (1.7 against 2.3 us a tile), and
    /// tile-major rows slowed its operands (width 1: 0.97x).
    pub(super) fn for_channels(cin: usize, cout: usize) -> Self {
        if narrow_in_registers(cin, cout) {
            Layout::TileMajor
        } else {
            Layout::PointMajor
        }
    }

    /// Floats of a block of `tiles` tiles of `c` channels.
    pub(super) fn len(self, [tiles, c]: [usize; 2]) -> usize {
        match self {
            Layout::PointMajor => POINTS * point_stride(tiles * c),
            Layout::TileMajor => tiles * POINTS * c,
        }
    }

    /// `[tile, point]`: how far apart two tiles' (and two points') runs of `c` channels lie,
    /// in a block of `tiles` tiles.
    pub(super) fn strides(self, [tiles, c]: [usize; 2]) -> [usize; 2] {
        match self {
            Layout::PointMajor => [c, point_stride(tiles * c)],
            Layout::TileMajor => [POINTS * c, c],
        }
    }
}

/// The kernels of the narrow layers ([`narrow_in_registers`]), compiled for AVX-512: the
/// forward's per-tile transforms a register of [`LANES`] channels at a time and its products
/// ([`Layout::TileMajor`]), and the weight gradient's sums. Lane by lane ([`input_tile`],
/// [`output_tile`]) the compiler's vectors went through arrays on the stack per tile. The
/// intrinsics are written out in functions compiled for AVX-512: operators on a register
/// type would not inline (trait methods cannot be compiled for AVX-512, and an intrinsic
/// called outside such a function stays a call), nor would closures left to `map` or
/// `std::array::from_fn`. The transforms do the same operations in the same order as
/// [`bt_times`] and [`at_times`], so both paths give the same bits (a test holds them to it).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{LANES, POINTS, TILE};
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_castps_si512, _mm512_castsi512_ps, _mm512_fmadd_ps,
        _mm512_loadu_ps, _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps, _mm512_sub_ps, _mm512_xor_si512,
    };

    /// The 36 GEMMs of a block of `tiles` tiles: `products[t][p][co] = sum over ci of
    /// inputs[t][p][ci] weights[ci][p][co]` (transformed tiles `[tiles, 36, C_in]`, weights
    /// `[C_in, 36, C_out]`, products `[tiles, 36, C_out]`), `C_out` in whole vectors. Per
    /// point and pair of output vectors (or the last single one), eight tiles at a time summed
    /// in registers: each input channel loads the weight vectors and broadcasts one input
    /// value per tile into an FMA each (eight independent sums cover the FMA's latency). At 16
    /// channels gemm's 16 x 6 kernel, its packing and per-call work cost more than these
    /// products.
    #[target_feature(enable = "avx512f")]
    pub(super) fn point_products(
        inputs: &[f32],
        weights: &[f32],
        products: &mut [f32],
        [tiles, cin, cout]: [usize; 3],
    ) {
        assert!(cout % LANES == 0, "output channels in whole vectors");
        assert!(
            inputs.len() >= tiles * POINTS * cin,
            "transformed inputs size"
        );
        assert!(
            weights.len() >= cin * POINTS * cout,
            "transformed weights size"
        );
        assert!(products.len() >= tiles * POINTS * cout, "products size");
        let buffers = [
            inputs.as_ptr(),
            weights.as_ptr(),
            products.as_mut_ptr() as *const f32,
        ];
        for p in 0..POINTS {
            for v in (0..cout).step_by(2 * LANES) {
                // SAFETY: the tiles, point `p` and the vectors from `v` lie within the
                // asserted sizes.
                unsafe {
                    if cout - v == LANES {
                        tile_runs::<8, 1>(buffers, [tiles, p, v], [cin, cout])
                    } else {
                        tile_runs::<8, 2>(buffers, [tiles, p, v], [cin, cout])
                    }
                }
            }
        }
    }

    /// The weight gradient's sums of `points` points: `sums[p][ci][co] += sum over t of
    /// grads[p][t][co] inputs[p][t][ci]` (inputs and gradients laid out with `[tile, point]`
    /// strides `[in_strides, grad_strides]`; sums `[points, C_in, C_out]`), for 16 or 32 output
    /// channels and input channels in whole vectors. Per point, the sums of a run of input
    /// channels by one or two output vectors stay in registers over all the tiles: each tile
    /// loads its output-gradient vectors and broadcasts each input value into an FMA per
    /// vector.
    #[target_feature(enable = "avx512f")]
    pub(super) fn gradient_products(
        inputs: &[f32],
        grads: &[f32],
        sums: &mut [f32],
        [points, tiles, cin, cout]: [usize; 4],
        [in_strides, grad_strides]: [[usize; 2]; 2],
    ) {
        assert!(
            cout == LANES || cout == 2 * LANES,
            "16 or 32 output channels"
        );
        assert!(cin % LANES == 0, "input channels in whole vectors");
        let last = |[tile, point]: [usize; 2], c: usize| {
            (tiles.max(1) - 1) * tile + (points.max(1) - 1) * point + c
        };
        assert!(
            inputs.len() >= last(in_strides, cin),
            "transformed inputs size"
        );
        assert!(
            grads.len() >= last(grad_strides, cout),
            "transformed gradient size"
        );
        assert!(sums.len() >= points * cin * cout, "sums size");
        let tile_strides = [in_strides[0], grad_strides[0]];
        for p in 0..points {
            let buffers = [
                inputs[p * in_strides[1]..].as_ptr(),
                grads[p * grad_strides[1]..].as_ptr(),
                sums[p * cin * cout..].as_mut_ptr() as *const f32,
            ];
            // SAFETY: every run of input channels lies within the point's asserted sizes.
            unsafe {
                if cout == LANES {
                    for c0 in (0..cin).step_by(16) {
                        channel_sums::<16, 1>(buffers, [c0, tiles, cout], tile_strides);
                    }
                } else {
                    for c0 in (0..cin).step_by(8) {
                        channel_sums::<8, 2>(buffers, [c0, tiles, cout], tile_strides);
                    }
                }
            }
        }
    }

    /// Sums of input channels `c0..c0 + C` by output vectors `0..V` of one point over its
    /// tiles (`[input, gradient]` tiles `tile_strides` apart), added to those in `sums`.
    ///
    /// # Safety
    /// The point's `[inputs, grads, sums]` hold `tiles` tiles of `C_in` and `C_out` channels
    /// and `C_in x C_out` sums, `c0 + C <= C_in` and `V` vectors `C_out`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn channel_sums<const C: usize, const V: usize>(
        [x, e, s]: [*const f32; 3],
        [c0, tiles, cout]: [usize; 3],
        [x_tile, e_tile]: [usize; 2],
    ) {
        let s = s as *mut f32;
        let mut acc = [[_mm512_setzero_ps(); V]; C];
        for (c, acc) in acc.iter_mut().enumerate() {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: within the sums (the caller's contract).
                *acc = unsafe { _mm512_loadu_ps(s.add((c0 + c) * cout + v * LANES)) };
            }
        }
        for t in 0..tiles {
            let mut grads = [_mm512_setzero_ps(); V];
            for (v, grads) in grads.iter_mut().enumerate() {
                // SAFETY: within the output gradient's tiles (the caller's contract).
                *grads = unsafe { _mm512_loadu_ps(e.add(t * e_tile + v * LANES)) };
            }
            for (c, acc) in acc.iter_mut().enumerate() {
                // SAFETY: within the input's tiles (the caller's contract).
                let input = _mm512_set1_ps(unsafe { *x.add(t * x_tile + c0 + c) });
                for (acc, &grads) in acc.iter_mut().zip(&grads) {
                    *acc = _mm512_fmadd_ps(input, grads, *acc);
                }
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm512_storeu_ps(s.add((c0 + c) * cout + v * LANES), acc) };
            }
        }
    }

    /// [`super::gradient_input`]'s rows `i0..i1` of one tile, `c` in whole vectors: the 4x4
    /// patch from `patch` (pixel `(i, j)` at `i * row + j * c`), point `4 (i - i0) + j` of
    /// the rows into `out` at `at`, points `stride` apart. The operations of
    /// [`super::input_row`], in its order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn gradient_input_tile(
        patch: &[f32],
        [row, c]: [usize; 2],
        [i0, i1]: [usize; 2],
        out: &mut [f32],
        [at, stride]: [usize; 2],
    ) {
        assert!(c % LANES == 0 && i0 < i1 && i1 <= 4 && patch.len() >= 3 * row + 4 * c);
        assert!(out.len() >= (4 * (i1 - i0) - 1) * stride + at + c);
        for k0 in (0..c).step_by(LANES) {
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for (i, pixels) in d.iter_mut().enumerate() {
                for (j, pixel) in pixels.iter_mut().enumerate() {
                    // SAFETY: within `patch` (asserted above).
                    *pixel = unsafe { _mm512_loadu_ps(patch.as_ptr().add(i * row + j * c + k0)) };
                }
            }
            for i in i0..i1 {
                // Row `i` of `B^T d`, then that row times `B`.
                let (a, b) = match i {
                    0 => (d[0], d[2]),
                    1 => (d[1], d[2]),
                    2 => (d[2], d[1]),
                    _ => (d[1], d[3]),
                };
                let mut t = [_mm512_setzero_ps(); 4];
                for (j, t) in t.iter_mut().enumerate() {
                    *t = if i == 1 {
                        _mm512_add_ps(a[j], b[j])
                    } else {
                        _mm512_sub_ps(a[j], b[j])
                    };
                }
                let v = [
                    _mm512_sub_ps(t[0], t[2]),
                    _mm512_add_ps(t[1], t[2]),
                    _mm512_sub_ps(t[2], t[1]),
                    _mm512_sub_ps(t[1], t[3]),
                ];
                for (j, &v) in v.iter().enumerate() {
                    let at = (4 * (i - i0) + j) * stride + at + k0;
                    // SAFETY: within `out` (asserted above).
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), v) };
                }
            }
        }
    }

    /// [`super::gradient_output_grad`]'s rows `i0..i1` of one 2x2 tile, `c` in whole vectors:
    /// pixel `(a, b)` of `pixels` at `a * row + b * c`, outputs as in [`gradient_input_tile`].
    /// The operations of [`super::output_grad_row`], in its order (a negation flips the sign
    /// bit, as f32's does).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn output_grad_tile(
        pixels: &[f32],
        [row, c]: [usize; 2],
        [i0, i1]: [usize; 2],
        out: &mut [f32],
        [at, stride]: [usize; 2],
    ) {
        assert!(c % LANES == 0 && i0 < i1 && i1 <= 4 && pixels.len() >= row + 2 * c);
        assert!(out.len() >= (4 * (i1 - i0) - 1) * stride + at + c);
        let sign = _mm512_set1_epi32(i32::MIN);
        let neg = |v: __m512| _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
        for k0 in (0..c).step_by(LANES) {
            // SAFETY: within `pixels` (asserted above).
            let load = |at: usize| unsafe { _mm512_loadu_ps(pixels.as_ptr().add(at + k0)) };
            let [e00, e01, e10, e11] = [load(0), load(c), load(row), load(row + c)];
            for i in i0..i1 {
                // Row `i` of `A e`, down each column.
                let (l, r) = match i {
                    0 => (e00, e01),
                    1 => (_mm512_add_ps(e00, e10), _mm512_add_ps(e01, e11)),
                    2 => (_mm512_sub_ps(e00, e10), _mm512_sub_ps(e01, e11)),
                    _ => (neg(e10), neg(e11)),
                };
                let u = [l, _mm512_add_ps(l, r), _mm512_sub_ps(l, r), neg(r)];
                for (j, &u) in u.iter().enumerate() {
                    let at = (4 * (i - i0) + j) * stride + at + k0;
                    // SAFETY: within `out` (asserted above).
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), u) };
                }
            }
        }
    }

    /// Output vectors `v..v + V` of point `p` for all tiles, `T` tiles at a time (the rest one
    /// by one).
    ///
    /// # Safety
    /// As [`tile_sums`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_runs<const T: usize, const V: usize>(
        buffers: [*const f32; 3],
        [tiles, p, v]: [usize; 3],
        sizes: [usize; 2],
    ) {
        let mut t0 = 0;
        while t0 + T <= tiles {
            // SAFETY: the caller's contract, for tiles `t0..t0 + T`.
            unsafe { tile_sums::<T, V>(buffers, [t0, p, v], sizes) };
            t0 += T;
        }
        for t in t0..tiles {
            // SAFETY: as above, for tile `t`.
            unsafe { tile_sums::<1, V>(buffers, [t, p, v], sizes) };
        }
    }

    /// Products of point `p` and output channels `v..v + 16 V` for tiles `t0..t0 + T`.
    ///
    /// # Safety
    /// The tiles, `p` and the channels lie within the buffers `[inputs, weights, products]`
    /// of [`point_products`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_sums<const T: usize, const V: usize>(
        [x, w, out]: [*const f32; 3],
        [t0, p, v]: [usize; 3],
        [cin, cout]: [usize; 2],
    ) {
        let mut sums = [[_mm512_setzero_ps(); V]; T];
        for ci in 0..cin {
            let row = (ci * POINTS + p) * cout + v;
            // Not `std::array::from_fn`: its closure would stay a call, compiled without
            // AVX-512 (see [`super::super::wide`]).
            let mut weights = [_mm512_setzero_ps(); V];
            for (k, weights) in weights.iter_mut().enumerate() {
                // SAFETY: within the buffers (the caller's contract).
                *weights = unsafe { _mm512_loadu_ps(w.add(row + k * LANES)) };
            }
            for (t, sums) in sums.iter_mut().enumerate() {
                // SAFETY: as above.
                let input = _mm512_set1_ps(unsafe { *x.add(((t0 + t) * POINTS + p) * cin + ci) });
                for (sum, &weights) in sums.iter_mut().zip(&weights) {
                    *sum = _mm512_fmadd_ps(input, weights, *sum);
                }
            }
        }
        for (t, sums) in sums.iter().enumerate() {
            for (k, &sum) in sums.iter().enumerate() {
                let at = ((t0 + t) * POINTS + p) * cout + v + k * LANES;
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps((out as *mut f32).add(at), sum) };
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn bt_times([v0, v1, v2, v3, v4, v5]: [__m512; 6]) -> [__m512; 6] {
        let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
        let (two, four, five) = (
            _mm512_set1_ps(2.0),
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(5.0),
        );
        let (sum, diff) = (sub(v4, mul(four, v2)), sub(v3, mul(four, v1)));
        let (sum2, diff2) = (sub(v4, v2), mul(two, sub(v3, v1)));
        [
            add(sub(mul(four, v0), mul(five, v2)), v4),
            add(sum, diff),
            sub(sum, diff),
            add(sum2, diff2),
            sub(sum2, diff2),
            add(sub(mul(four, v1), mul(five, v3)), v5),
        ]
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn at_times([v0, v1, v2, v3, v4, v5]: [__m512; 6]) -> [__m512; 4] {
        let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
        let (two, four, eight) = (
            _mm512_set1_ps(2.0),
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(8.0),
        );
        let (sum, diff) = (add(v1, v2), sub(v1, v2));
        let (sum2, diff2) = (add(v3, v4), sub(v3, v4));
        [
            add(add(v0, sum), sum2),
            add(diff, mul(two, diff2)),
            add(sum, mul(four, sum2)),
            add(add(diff, mul(eight, diff2)), v5),
        ]
    }

    /// [`super::two_sided`] in registers: `v[i][j]` the tile, `times` each column and then
    /// each row of the result. Written out without closures or `map`: one left out of line is
    /// a call per use.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn two_sided<const R: usize>(
        v: &[[__m512; 6]; 6],
        times: impl Fn([__m512; 6]) -> [__m512; R],
    ) -> [[__m512; R]; R] {
        let mut columns = [[_mm512_setzero_ps(); R]; 6];
        for (j, column) in columns.iter_mut().enumerate() {
            *column = times([v[0][j], v[1][j], v[2][j], v[3][j], v[4][j], v[5][j]]);
        }
        let mut rows = [[_mm512_setzero_ps(); R]; R];
        for (i, row) in rows.iter_mut().enumerate() {
            let c = &columns;
            *row = times([c[0][i], c[1][i], c[2][i], c[3][i], c[4][i], c[5][i]]);
        }
        rows
    }

    /// [`super::input_tile`] for `c` in whole vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn input_tile(
        patch: &[f32],
        [row, c]: [usize; 2],
        out: &mut [f32],
        [at, stride]: [usize; 2],
    ) {
        assert!(c % LANES == 0 && patch.len() >= 5 * row + 6 * c);
        assert!(out.len() >= 35 * stride + at + c);
        for k0 in (0..c).step_by(LANES) {
            let mut d = [[_mm512_setzero_ps(); 6]; 6];
            for (i, pixels) in d.iter_mut().enumerate() {
                for (j, pixel) in pixels.iter_mut().enumerate() {
                    // SAFETY: within `patch` (asserted above).
                    *pixel = unsafe { _mm512_loadu_ps(patch.as_ptr().add(i * row + j * c + k0)) };
                }
            }
            for (i, points) in two_sided(&d, |v| bt_times(v)).iter().enumerate() {
                for (j, &point) in points.iter().enumerate() {
                    let at = (6 * i + j) * stride + at + k0;
                    // SAFETY: within `out` (asserted above).
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), point) };
                }
            }
        }
    }

    /// [`super::output_tile`] for `cout` in whole vectors: the tile's products of each point
    /// from `at`, `stride` apart, as its 4x4 outputs channels-last into `band`, output `(a,
    /// b)` at `a * row + b * cout` (`row` apart).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn output_tile(
        products: &[f32],
        [at, stride, cout]: [usize; 3],
        band: &mut [f32],
        row: usize,
    ) {
        assert!(cout % LANES == 0 && products.len() >= 35 * stride + at + cout);
        assert!(band.len() >= (TILE - 1) * row + TILE * cout);
        for c0 in (0..cout).step_by(LANES) {
            let mut m = [[_mm512_setzero_ps(); 6]; 6];
            for (i, points) in m.iter_mut().enumerate() {
                for (j, point) in points.iter_mut().enumerate() {
                    let at = (6 * i + j) * stride + at + c0;
                    // SAFETY: within `products` (asserted above).
                    *point = unsafe { _mm512_loadu_ps(products.as_ptr().add(at)) };
                }
            }
            for (a, outputs) in two_sided(&m, |v| at_times(v)).iter().enumerate() {
                for (b, &value) in outputs.iter().enumerate() {
                    let at = a * row + b * cout + c0;
                    // SAFETY: within `band` (asserted above).
                    unsafe { _mm512_storeu_ps(band.as_mut_ptr().add(at), value) };
                }
            }
        }
    }
}

/// The 36 GEMMs of a block of `tiles` transformed tiles with the transformed weights
/// (`[C_in, 36, C_out]`) into `products`, tiles and products [`Layout::TileMajor`] (which
/// the channels must allow).
pub(super) fn point_products(
    inputs: &[f32],
    weights: &[f32],
    products: &mut [f32],
    sizes: [usize; 3],
) {
    let [_, cin, cout] = sizes;
    assert_eq!(Layout::for_channels(cin, cout), Layout::TileMajor);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the layout is tile-major only where the CPU has AVX-512.
    unsafe {
        avx512::point_products(inputs, weights, products, sizes)
    }
}

/// The weight gradient's sums of `points` points (`[points, C_in, C_out]`), added to: the
/// products over the tiles of each point's transformed input and output gradient (laid out
/// with `[tile, point]` strides `[in_strides, grad_strides]`), where [`narrow_in_registers`]
/// holds. Point by point, as [`gradient_input`] lays them out: each point's tiles are then
/// read in one stream (tile-major measured slower here, unlike the forward: 0.98x).
pub(super) fn gradient_products(
    inputs: &[f32],
    grads: &[f32],
    sums: &mut [f32],
    sizes: [usize; 4],
    strides: [[usize; 2]; 2],
) {
    let [_, _, cin, cout] = sizes;
    assert!(narrow_in_registers(cin, cout));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `narrow_in_registers` holds only where the CPU has AVX-512.
    unsafe {
        avx512::gradient_products(inputs, grads, sums, sizes, strides)
    }
}

/// The 6x6 patches of output tile rows `first..first + rows` of `count` padded channels-last
/// samples (`[count, hp, wp, C]`, padding 1 before, zeros after the image out to whole tiles)
/// as `B^T d B`, into `out` (laid out as `layout`, tile `(s, ty, tx)` number `(s * rows + ty -
/// first) * tw + tx`).
#[inline(always)]
pub(super) fn transform_input(
    padded: &[f32],
    [count, hp, wp, c]: [usize; 4],
    [first, rows]: [usize; 2],
    tw: usize,
    out: &mut [f32],
    layout: Layout,
) {
    let tiles = count * rows * tw;
    let [tile_stride, stride] = layout.strides([tiles, c]);
    assert_eq!(out.len(), layout.len([tiles, c]), "transformed input size");
    assert!(padded.len() >= count * hp * wp * c && wp >= TILE * tw + 2);
    assert!(
        TILE * (first + rows) + 2 <= hp,
        "tile rows beyond the padded rows"
    );
    // A tile's pixels and points, a vector of channels each: filled in place, once per call
    // (zeroed per tile, or built by value and moved, they would cost a memset or a memcpy).
    let mut arrays = ([[[0.0f32; LANES]; 6]; 6], [[0.0f32; LANES]; POINTS]);
    for s in 0..count {
        for ty in first..first + rows {
            for tx in 0..tw {
                let tile = (s * rows + ty - first) * tw + tx;
                let corner = ((s * hp + TILE * ty) * wp + TILE * tx) * c;
                let patch = &padded[corner..];
                let at = [tile * tile_stride, stride];
                #[cfg(target_arch = "x86_64")]
                if layout == Layout::TileMajor {
                    // SAFETY: the layout is tile-major only where the CPU has AVX-512.
                    unsafe { avx512::input_tile(patch, [wp * c, c], out, at) };
                    continue;
                }
                input_tile(patch, [wp * c, c], &mut arrays, out, at);
            }
        }
    }
}

/// `B^T d B` of the patch whose top left pixel starts `patch` (pixel `(i, j)` a run of `c`
/// channels at `i * row + j * c`), into point `p`'s values at `out[p * stride + at..][..c]`.
/// A vector of channels at a time: loaded into arrays of lanes, the compiler vectorises the
/// lanes. Offsets rather than 72 slices: making those cost more than the transform at a few
/// channels (width 0.25: the step 1.04x).
#[inline(always)]
fn input_tile(
    patch: &[f32],
    [row, c]: [usize; 2],
    (pixels, points): &mut ([[[f32; LANES]; 6]; 6], [[f32; LANES]; POINTS]),
    out: &mut [f32],
    [at, stride]: [usize; 2],
) {
    for k0 in (0..c).step_by(LANES) {
        let nk = LANES.min(c - k0);
        for (i, pixel_row) in pixels.iter_mut().enumerate() {
            for (j, vector) in pixel_row.iter_mut().enumerate() {
                *vector = load(&patch[i * row + j * c + k0..], nk);
            }
        }
        for l in 0..LANES {
            let d = |i: usize, j: usize| pixels[i][j][l];
            two_sided(d, bt_times, |i, j, value| points[6 * i + j][l] = value);
        }
        for (p, point) in points.iter().enumerate() {
            store(&mut out[p * stride + at + k0..], point, nk);
        }
    }
}

/// The products (laid out as `layout`, tiles as in [`transform_input`]) as `A^T m A`, each
/// tile's 4x4 outputs written into `out` (`[count, C_out, ho, wo]`: every slot of output rows
/// `4 * first..4 * (first + rows)` that lie in it, so that it need not be zeroed first); `band`
/// holds one sample's outputs channels-last, whole tiles, before they are transposed into
/// `out`.
#[inline(always)]
pub(super) fn transform_output(
    products: &[f32],
    [count, cout, ho, wo]: [usize; 4],
    [first, rows]: [usize; 2],
    band: &mut Vec<f32>,
    out: &mut [MaybeUninit<f32>],
    layout: Layout,
) {
    let tw = wo.div_ceil(TILE);
    let tiles = count * rows * tw;
    let [tile_stride, stride] = layout.strides([tiles, cout]);
    assert_eq!(products.len(), layout.len([tiles, cout]), "products size");
    assert_eq!(out.len(), count * cout * ho * wo, "output size");
    let band_width = TILE * tw;
    band.resize(TILE * rows * band_width * cout, 0.0);
    // The output pixels of these tile rows, a contiguous run of each output plane.
    let start = TILE * first * wo;
    let pixels = (TILE * (first + rows)).min(ho) * wo - start;
    // Output pixel `start + p`'s run of channels in `band`.
    let at = |p: usize| (p / wo * band_width + p % wo) * cout;
    // One tile's products and outputs, a vector of channels each (in place, as in
    // [`transform_input`]).
    let (mut m, mut y) = ([[0.0f32; LANES]; POINTS], [[0.0f32; LANES]; TILE * TILE]);
    for s in 0..count {
        for ty in first..first + rows {
            for tx in 0..tw {
                let tile = (s * rows + ty - first) * tw + tx;
                // Output `(a, b)` of the tile: band row `4 (ty - first) + a`, column `4 tx + b`.
                let pixel = |a: usize| ((TILE * (ty - first) + a) * band_width + TILE * tx) * cout;
                #[cfg(target_arch = "x86_64")]
                if layout == Layout::TileMajor {
                    // SAFETY: the layout is tile-major only where the CPU has AVX-512.
                    unsafe {
                        avx512::output_tile(
                            products,
                            [tile * tile_stride, stride, cout],
                            &mut band[pixel(0)..],
                            band_width * cout,
                        )
                    };
                    continue;
                }
                for c0 in (0..cout).step_by(LANES) {
                    let nc = LANES.min(cout - c0);
                    for (p, point) in m.iter_mut().enumerate() {
                        *point = load(&products[p * stride + tile * tile_stride + c0..], nc);
                    }
                    output_tile(&m, &mut y);
                    for (a, row) in y.chunks_exact(TILE).enumerate() {
                        for (b, values) in row.iter().enumerate() {
                            store(&mut band[pixel(a) + b * cout + c0..], values, nc);
                        }
                    }
                }
            }
        }
        let planes = &mut out[s * cout * ho * wo..][..cout * ho * wo];
        for p0 in (0..pixels).step_by(LANES) {
            let np = LANES.min(pixels - p0);
            for c0 in (0..cout).step_by(LANES) {
                let nc = LANES.min(cout - c0);
                let mut block = [[0.0f32; LANES]; LANES];
                for (i, row) in block.iter_mut().take(np).enumerate() {
                    *row = load(&band[at(p0 + i) + c0..], nc);
                }
                super::transpose16(&mut block);
                for (j, row) in block.iter().take(nc).enumerate() {
                    store_slots(&mut planes[(c0 + j) * ho * wo + start + p0..], row, np);
                }
            }
        }
    }
}

/// `A^T m A` of one tile's products (`m[6 i + j]`, a vector of channels each): its 4x4 outputs
/// into `y[4 a + b]`, lane by lane.
#[inline(always)]
fn output_tile(m: &[[f32; LANES]; POINTS], y: &mut [[f32; LANES]; TILE * TILE]) {
    for l in 0..LANES {
        let v = |i: usize, j: usize| m[6 * i + j][l];
        two_sided(v, at_times, |a, b, value| y[TILE * a + b][l] = value);
    }
}

/// `T v T^T` of a 6x6 tile, `v(i, j)` its values and `times` the product by `T` (`B^T` or
/// `A^T`): each column through `times`, then each row of that; `out(i, j, value)` takes the
/// `R x R` result. Array literals, not `std::array::from_fn` (see [`super::wide`]).
#[inline(always)]
fn two_sided<const R: usize>(
    v: impl Fn(usize, usize) -> f32,
    times: impl Fn([f32; 6]) -> [f32; R],
    mut out: impl FnMut(usize, usize, f32),
) {
    // `columns[j]` is column `j` of `T v`.
    let column = |j| times([v(0, j), v(1, j), v(2, j), v(3, j), v(4, j), v(5, j)]);
    let columns = [
        column(0),
        column(1),
        column(2),
        column(3),
        column(4),
        column(5),
    ];
    // Row `i` of `T v` is value `i` of every column.
    #[allow(clippy::needless_range_loop)]
    for i in 0..R {
        let c = |j: usize| columns[j][i];
        let row = times([c(0), c(1), c(2), c(3), c(4), c(5)]);
        for (j, value) in row.into_iter().enumerate() {
            out(i, j, value);
        }
    }
}

/// The tiles of tile rows `first..first + rows` of `count` samples, `tw` a row, as `[number,
/// sample, tile row, tile column]`: numbered `(s * rows + ty - first) * tw + tx`, as the
/// transforms lay them out.
fn block_tiles(
    count: usize,
    [first, rows]: [usize; 2],
    tw: usize,
) -> impl Iterator<Item = [usize; 4]> {
    (0..count).flat_map(move |s| {
        (first..first + rows).flat_map(move |ty| {
            (0..tw).map(move |tx| [(s * rows + ty - first) * tw + tx, s, ty, tx])
        })
    })
}

/// The weight gradient's F(3x3, 2x2): the 4x4 patches of output tile rows `first..first + rows`
/// (2x2 tiles) of `count` padded channels-last samples (`[count, hp, wp, C]`, padding 1
/// included) as `B^T d B`, into `out` (`[16, tiles, C]`, tile `(s, ty, tx)` at `(s * rows + ty
/// - first) * tw + tx`): only its rows `i0..i1` (points `4 i0..4 i1`, which cost that share of
/// the work), the first of them at the start of `out`.
#[inline(always)]
pub(super) fn gradient_input(
    padded: &[f32],
    [count, hp, wp, c]: [usize; 4],
    [first, rows]: [usize; 2],
    tw: usize,
    [i0, i1]: [usize; 2],
    out: &mut [f32],
) {
    let tiles = count * rows * tw;
    let stride = point_stride(tiles * c);
    assert!(i0 < i1 && i1 <= 4);
    assert_eq!(out.len(), 4 * (i1 - i0) * stride, "transformed input size");
    assert!(padded.len() >= count * hp * wp * c && wp >= 2 * tw + 2);
    assert!(
        2 * (first + rows) + 2 <= hp,
        "tile rows beyond the padded rows"
    );
    #[cfg(target_arch = "x86_64")]
    if narrow(c) {
        for [tile, s, ty, tx] in block_tiles(count, [first, rows], tw) {
            let patch = &padded[((s * hp + 2 * ty) * wp + 2 * tx) * c..];
            let (shape, at) = ([wp * c, c], [tile * c, stride]);
            // SAFETY: `narrow` holds only where the CPU has AVX-512.
            unsafe { avx512::gradient_input_tile(patch, shape, [i0, i1], out, at) };
        }
        return;
    }
    let mut points: Vec<&mut [f32]> = out.chunks_mut(stride).collect();
    for s in 0..count {
        for ty in first..first + rows {
            for tx in 0..tw {
                let tile = (s * rows + ty - first) * tw + tx;
                // Pixel `j` of row `i` of the 4x4 patch: a run of channels.
                let d = |i: usize, j: usize| {
                    &padded[((s * hp + 2 * ty + i) * wp + 2 * tx + j) * c..][..c]
                };
                let row = |i: usize| [d(i, 0), d(i, 1), d(i, 2), d(i, 3)];
                for i in i0..i1 {
                    let v = point_row(&mut points, i - i0, tile * c, c);
                    // Row `i` of `B^T d`, then that row times `B`.
                    match i {
                        0 => input_row(row(0), row(2), v, |a, b| a - b),
                        1 => input_row(row(1), row(2), v, |a, b| a + b),
                        2 => input_row(row(2), row(1), v, |a, b| a - b),
                        _ => input_row(row(1), row(3), v, |a, b| a - b),
                    }
                }
            }
        }
    }
}

/// The runs `at..at + len` of the four points of row `row` among `points` (each point's
/// transformed values, [`point_stride`] apart as [`gradient_input`] splits them).
#[inline(always)]
fn point_row<'a>(
    points: &'a mut [&mut [f32]],
    row: usize,
    at: usize,
    len: usize,
) -> [&'a mut [f32]; 4] {
    let [p0, p1, p2, p3] = &mut points[4 * row..4 * row + 4] else {
        unreachable!("four points a row")
    };
    [p0, p1, p2, p3].map(|p| &mut p[at..at + len])
}

/// One row of `B^T d B` over a run of channels: `t = f(a, b)` pixel by pixel (the row of
/// `B^T d` from two rows of the patch), then `[t0 - t2, t1 + t2, t2 - t1, t1 - t3]`. A loop
/// over the channels, which the compiler vectorises.
#[inline(always)]
fn input_row(a: [&[f32]; 4], b: [&[f32]; 4], v: [&mut [f32]; 4], f: impl Fn(f32, f32) -> f32) {
    let n = v[0].len();
    let [a0, a1, a2, a3] = a.map(|a| &a[..n]);
    let [b0, b1, b2, b3] = b.map(|b| &b[..n]);
    let [v0, v1, v2, v3] = v.map(|v| &mut v[..n]);
    for k in 0..n {
        let [t0, t1, t2, t3] = [
            f(a0[k], b0[k]),
            f(a1[k], b1[k]),
            f(a2[k], b2[k]),
            f(a3[k], b3[k]),
        ];
        v0[k] = t0 - t2;
        v1[k] = t1 + t2;
        v2[k] = t2 - t1;
        v3[k] = t1 - t3;
    }
}

/// The first `n` (at most [`LANES`]) values of `values` as a vector, zeros after them: a
/// whole vector is a copy of fixed size (a few moves), a partial one goes value by value.
#[inline(always)]
pub(super) fn load(values: &[f32], n: usize) -> [f32; LANES] {
    if n == LANES {
        return values[..LANES].try_into().expect("a whole vector");
    }
    let mut vector = [0.0; LANES];
    vector[..n].copy_from_slice(&values[..n]);
    vector
}

/// The first `n` values of `vector` into the start of `out`, as [`load`] reads them.
#[inline(always)]
pub(super) fn store(out: &mut [f32], vector: &[f32; LANES], n: usize) {
    if n == LANES {
        out[..LANES].copy_from_slice(vector);
        return;
    }
    for (o, &v) in out[..n].iter_mut().zip(vector) {
        *o = v;
    }
}

/// As [`store`], into slots of uninitialised memory.
#[inline(always)]
fn store_slots(out: &mut [MaybeUninit<f32>], vector: &[f32; LANES], n: usize) {
    if n == LANES {
        let out: &mut [MaybeUninit<f32>; LANES] =
            (&mut out[..LANES]).try_into().expect("a whole vector");
        *out = vector.map(MaybeUninit::new);
        return;
    }
    for (o, &v) in out[..n].iter_mut().zip(vector) {
        o.write(v);
    }
}

/// The output gradient's 2x2 tiles at tile rows `first..first + rows` of `count` channels-last
/// samples (`[count, ho, wo, C]`) as `A e A^T`, into `out` (`[16, tiles, C]`, laid out as
/// [`gradient_input`]'s): the weight gradient's F(3x3, 2x2), whose 16 products with the
/// input's `B^T d B` ([`gradient_input`]'s) summed over the tiles give `G^T M G`
/// ([`weight_gradient_from_points`]). As there, only rows `i0..i1` of the points.
#[inline(always)]
pub(super) fn gradient_output_grad(
    grads: &[f32],
    [count, ho, wo, c]: [usize; 4],
    [first, rows]: [usize; 2],
    [i0, i1]: [usize; 2],
    out: &mut [f32],
) {
    let tw = wo / 2;
    let tiles = count * rows * tw;
    let stride = point_stride(tiles * c);
    assert!(i0 < i1 && i1 <= 4);
    assert_eq!(
        out.len(),
        4 * (i1 - i0) * stride,
        "transformed gradient size"
    );
    assert!(grads.len() >= count * ho * wo * c && 2 * (first + rows) <= ho);
    #[cfg(target_arch = "x86_64")]
    if narrow(c) {
        for [tile, s, ty, tx] in block_tiles(count, [first, rows], tw) {
            let pixels = &grads[((s * ho + 2 * ty) * wo + 2 * tx) * c..];
            let (shape, at) = ([wo * c, c], [tile * c, stride]);
            // SAFETY: `narrow` holds only where the CPU has AVX-512.
            unsafe { avx512::output_grad_tile(pixels, shape, [i0, i1], out, at) };
        }
        return;
    }
    let mut points: Vec<&mut [f32]> = out.chunks_mut(stride).collect();
    for s in 0..count {
        for ty in first..first + rows {
            for tx in 0..tw {
                let tile = (s * rows + ty - first) * tw + tx;
                // The tile's pixel `(a, b)`: a run of channels.
                let e = |a: usize, b: usize| {
                    &grads[((s * ho + 2 * ty + a) * wo + 2 * tx + b) * c..][..c]
                };
                let (top, bottom) = ([e(0, 0), e(0, 1)], [e(1, 0), e(1, 1)]);
                for i in i0..i1 {
                    let u = point_row(&mut points, i - i0, tile * c, c);
                    // Row `i` of `A e`: `A v = [v0, v0 + v1, v0 - v1, -v1]` down each column.
                    match i {
                        0 => output_grad_row(top, bottom, u, |a, _| a),
                        1 => output_grad_row(top, bottom, u, |a, b| a + b),
                        2 => output_grad_row(top, bottom, u, |a, b| a - b),
                        _ => output_grad_row(top, bottom, u, |_, b| -b),
                    }
                }
            }
        }
    }
}

/// One row of `A e A^T` over a run of channels: `(l, r) = (f(e00, e10), f(e01, e11))` (the
/// row of `A e`), then `[l, l + r, l - r, -r]`.
#[inline(always)]
fn output_grad_row(
    top: [&[f32]; 2],
    bottom: [&[f32]; 2],
    u: [&mut [f32]; 4],
    f: impl Fn(f32, f32) -> f32,
) {
    let n = u[0].len();
    let [e00, e01] = top.map(|e| &e[..n]);
    let [e10, e11] = bottom.map(|e| &e[..n]);
    let [u0, u1, u2, u3] = u.map(|u| &mut u[..n]);
    for k in 0..n {
        let (l, r) = (f(e00[k], e10[k]), f(e01[k], e11[k]));
        u0[k] = l;
        u1[k] = l + r;
        u2[k] = l - r;
        u3[k] = -r;
    }
}

/// The weight gradient `[C_out, C_in, 3, 3]` from the sums over all tiles of the products of
/// the transformed gradients and inputs, `[16, C_in, C_out]`: `G^T M G` for each pair of
/// channels, with `G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 1]`.
pub(super) fn weight_gradient_from_points(sums: &[f32], [cout, cin]: [usize; 2]) -> Vec<f32> {
    use rayon::prelude::*;
    assert_eq!(sums.len(), GRADIENT_POINTS * cin * cout, "sums size");
    // `G^T v` of a 4-vector.
    let gt = |[a, b, c, d]: [f32; 4]| [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d];
    let mut out = vec![0.0; cout * cin * 9];
    // Blocks of output channels: the sums are read in runs of the block's channels, and each
    // channel's kernels written in order.
    const BLOCK: usize = 16;
    out.par_chunks_mut(BLOCK * cin * 9)
        .enumerate()
        .for_each(|(block, kernels)| {
            let co0 = block * BLOCK;
            for ci in 0..cin {
                for (k, kernels) in kernels.chunks_exact_mut(cin * 9).enumerate() {
                    let m = |p: usize| sums[(p * cin + ci) * cout + co0 + k];
                    // Columns of `G^T M`, then each of its three rows through `G^T` again.
                    let columns: [[f32; 3]; 4] =
                        std::array::from_fn(|j| gt([m(j), m(4 + j), m(8 + j), m(12 + j)]));
                    for i in 0..3 {
                        let row = gt([columns[0][i], columns[1][i], columns[2][i], columns[3][i]]);
                        kernels[ci * 9 + 3 * i..][..3].copy_from_slice(&row);
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_values as values;

    /// The 3x3, stride-1, padding-1 cross-correlation as its definition, in f64.
    fn direct(x: &[f32], [n, cin, h, w]: [usize; 4], weights: &[f32], cout: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * cout * h * w];
        for s in 0..n {
            for co in 0..cout {
                for oy in 0..h {
                    for ox in 0..w {
                        let mut sum = 0.0f64;
                        for c in 0..cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (y, x_) = (oy + i, ox + j);
                                    if y < 1 || x_ < 1 || y > h || x_ > w {
                                        continue;
                                    }
                                    let v = x[((s * cin + c) * h + y - 1) * w + x_ - 1];
                                    let g = weights[((co * cin + c) * 3 + i) * 3 + j];
                                    sum += f64::from(v) * f64::from(g);
                                }
                            }
                        }
                        out[((s * cout + co) * h + oy) * w + ox] = sum as f32;
                    }
                }
            }
        }
        out
    }

    /// The three transforms with the 36 products summed in plain loops, over tile rows in
    /// chunks of `chunk`.
    fn winograd(
        x: &[f32],
        [n, cin, h, w]: [usize; 4],
        weights: &[f32],
        cout: usize,
        chunk: usize,
    ) -> Vec<f32> {
        let (th, tw) = (h.div_ceil(TILE), w.div_ceil(TILE));
        let (hp, wp) = (TILE * th + 2, TILE * tw + 2);
        let padded = channels_last(x, [n, cin, h, w], 1, [hp, wp]);
        let u = transform_weights(weights, [cout, cin]);
        let mut out = vec![MaybeUninit::new(f32::NAN); n * cout * h * w];
        let mut band = Vec::new();
        for first in (0..th).step_by(chunk) {
            let rows = chunk.min(th - first);
            let tiles = n * rows * tw;
            let layout = Layout::for_channels(cin, cout);
            let mut v = vec![f32::NAN; layout.len([tiles, cin])];
            transform_input(&padded, [n, hp, wp, cin], [first, rows], tw, &mut v, layout);
            let mut m = vec![0.0; layout.len([tiles, cout])];
            if layout == Layout::TileMajor {
                point_products(&v, &u, &mut m, [tiles, cin, cout]);
            } else {
                let ([in_tile, in_point], [out_tile, out_point]) =
                    (layout.strides([tiles, cin]), layout.strides([tiles, cout]));
                for p in 0..POINTS {
                    for co in 0..cout {
                        for c in 0..cin {
                            let g = u[(c * POINTS + p) * cout + co];
                            for t in 0..tiles {
                                m[p * out_point + t * out_tile + co] +=
                                    g * v[p * in_point + t * in_tile + c];
                            }
                        }
                    }
                }
            }
            let (dims, span) = ([n, cout, h, w], [first, rows]);
            transform_output(&m, dims, span, &mut band, &mut out, layout);
        }
        // SAFETY: initialised to NaN (and then written by the transform).
        out.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    /// The register transforms and the lane-by-lane ones, to the bit (where this CPU has
    /// AVX-512; elsewhere only the lane transforms run).
    #[test]
    fn transforms_in_registers_match_the_lane_transforms_bit_for_bit() {
        let c = 2 * LANES;
        if Layout::for_channels(c, c) != Layout::TileMajor {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // One 6x6 patch of `c` channels, into its 36 points.
        let patch = values(36 * c, 3);
        let (mut lanes, mut registers) = (vec![0.0; POINTS * c], vec![0.0; POINTS * c]);
        let mut arrays = ([[[0.0f32; LANES]; 6]; 6], [[0.0f32; LANES]; POINTS]);
        input_tile(&patch, [6 * c, c], &mut arrays, &mut lanes, [0, c]);
        // SAFETY: the layout is tile-major only where the CPU has AVX-512.
        unsafe { avx512::input_tile(&patch, [6 * c, c], &mut registers, [0, c]) };
        assert_eq!(bits(&lanes), bits(&registers), "input transform");
        // One tile's 36 products of `c` channels, into its 4x4 outputs (channels last).
        let products = values(POINTS * c, 4);
        let mut lanes = vec![0.0; TILE * TILE * c];
        for c0 in (0..c).step_by(LANES) {
            let m: [[f32; LANES]; POINTS] =
                std::array::from_fn(|p| load(&products[p * c + c0..], LANES));
            let mut y = [[0.0f32; LANES]; TILE * TILE];
            output_tile(&m, &mut y);
            for (o, values) in y.iter().enumerate() {
                store(&mut lanes[o * c + c0..], values, LANES);
            }
        }
        let mut registers = vec![0.0; TILE * TILE * c];
        // SAFETY: as above.
        unsafe { avx512::output_tile(&products, [0, c, c], &mut registers, TILE * c) };
        assert_eq!(bits(&lanes), bits(&registers), "output transform");
    }

    /// The weight gradient's register transforms and the lane-by-lane ones, to the bit, for
    /// all four point rows and for a part of them (where this CPU has AVX-512).
    #[test]
    fn gradient_transforms_in_registers_match_the_lane_ones_bit_for_bit() {
        let c = 2 * LANES;
        if !narrow(c) {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // A 4x4 patch of `c` channels; its top left 2x2 pixels as an output-gradient tile.
        // Zeros among the values, so that a sign of zero would show.
        let mut patch = values(16 * c, 5);
        patch.iter_mut().step_by(7).for_each(|v| *v = 0.0);
        let row = 4 * c;
        for [i0, i1] in [[0, 4], [1, 3]] {
            let n = 4 * (i1 - i0) * c;
            let lanes = |transform: &dyn Fn(&mut [&mut [f32]])| {
                let mut out = vec![0.0; n];
                let mut points: Vec<&mut [f32]> = out.chunks_mut(c).collect();
                transform(&mut points);
                out
            };
            let d = |i: usize, j: usize| &patch[i * row + j * c..][..c];
            let rows = |i: usize| [d(i, 0), d(i, 1), d(i, 2), d(i, 3)];
            let input_lanes = lanes(&|points| {
                for i in i0..i1 {
                    let v = point_row(points, i - i0, 0, c);
                    match i {
                        0 => input_row(rows(0), rows(2), v, |a, b| a - b),
                        1 => input_row(rows(1), rows(2), v, |a, b| a + b),
                        2 => input_row(rows(2), rows(1), v, |a, b| a - b),
                        _ => input_row(rows(1), rows(3), v, |a, b| a - b),
                    }
                }
            });
            let grad_lanes = lanes(&|points| {
                let (top, bottom) = ([d(0, 0), d(0, 1)], [d(1, 0), d(1, 1)]);
                for i in i0..i1 {
                    let u = point_row(points, i - i0, 0, c);
                    match i {
                        0 => output_grad_row(top, bottom, u, |a, _| a),
                        1 => output_grad_row(top, bottom, u, |a, b| a + b),
                        2 => output_grad_row(top, bottom, u, |a, b| a - b),
                        _ => output_grad_row(top, bottom, u, |_, b| -b),
                    }
                }
            });
            let (mut input_registers, mut grad_registers) = (vec![0.0; n], vec![0.0; n]);
            // SAFETY: `narrow` found AVX-512.
            unsafe {
                avx512::gradient_input_tile(
                    &patch,
                    [row, c],
                    [i0, i1],
                    &mut input_registers,
                    [0, c],
                );
                avx512::output_grad_tile(&patch, [row, c], [i0, i1], &mut grad_registers, [0, c]);
            }
            assert_eq!(
                bits(&input_lanes),
                bits(&input_registers),
                "input, rows {i0}..{i1}"
            );
            assert_eq!(
                bits(&grad_lanes),
                bits(&grad_registers),
                "gradient, rows {i0}..{i1}"
            );
        }
    }

    #[test]
    fn matches_the_direct_convolution() {
        for (shape, cout, chunk) in [
            ([1, 1, 4, 4], 1, 1),
            ([2, 3, 8, 12], 5, 1),
            ([2, 3, 16, 16], 4, 3),
            ([1, 7, 12, 8], 2, 8),
            // Partial tiles: outputs not a multiple of 4, down to a single pixel.
            ([2, 3, 6, 9], 5, 1),
            ([1, 2, 1, 1], 3, 1),
            ([1, 4, 7, 2], 2, 1),
            // More channels than a vector of lanes, and not a multiple of it.
            ([2, 19, 4, 4], 33, 1),
            // Whole vectors of channels: the transforms in registers on AVX-512.
            ([2, 16, 8, 8], 32, 1),
        ] {
            let [n, cin, h, w] = shape;
            let x = values(n * cin * h * w, 1);
            let weights = values(cout * cin * 9, 2);
            let (ours, exact) = (
                winograd(&x, shape, &weights, cout, chunk),
                direct(&x, shape, &weights, cout),
            );
            // Some ten units in the last place of the terms (each below 1, 9 x C_in of them).
            let bound = 1e-6 * (9 * cin) as f32;
            for (i, (a, b)) in ours.iter().zip(&exact).enumerate() {
                assert!((a - b).abs() <= bound, "{shape:?}[{i}]: {a} vs {b}");
            }
        }
    }

    /// The weight gradient of the 3x3, stride-1, padding-1 cross-correlation as its
    /// definition, in f64: `dW[co, c, i, j] = sum dy[s, co, y, x] x_pad[s, c, y + i, x + j]`.
    fn direct_weight_gradient(
        x: &[f32],
        [n, cin, h, w]: [usize; 4],
        dy: &[f32],
        cout: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0; cout * cin * 9];
        for co in 0..cout {
            for c in 0..cin {
                for i in 0..3 {
                    for j in 0..3 {
                        let mut sum = 0.0f64;
                        for s in 0..n {
                            for y in 0..h {
                                for x_ in 0..w {
                                    let (py, px) = (y + i, x_ + j);
                                    if py < 1 || px < 1 || py > h || px > w {
                                        continue;
                                    }
                                    let v = x[((s * cin + c) * h + py - 1) * w + px - 1];
                                    let e = dy[((s * cout + co) * h + y) * w + x_];
                                    sum += f64::from(v) * f64::from(e);
                                }
                            }
                        }
                        out[((co * cin + c) * 3 + i) * 3 + j] = sum as f32;
                    }
                }
            }
        }
        out
    }

    /// `[n, c, h, w]` as `[n, hp, wp, c]`, `pad` rows and columns of zeros before the image
    /// and the rest after.
    fn channels_last(
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        pad: usize,
        [hp, wp]: [usize; 2],
    ) -> Vec<f32> {
        let mut out = vec![0.0; n * hp * wp * c];
        for s in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    for x_ in 0..w {
                        out[((s * hp + y + pad) * wp + x_ + pad) * c + ch] =
                            x[((s * c + ch) * h + y) * w + x_];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        for (shape, cout, chunk) in [
            ([1, 1, 2, 2], 1, 1),
            ([2, 3, 4, 6], 5, 1),
            ([3, 19, 6, 4], 33, 2),
            // 16 and 32 channels: on AVX-512 the sums by `gradient_products`.
            ([2, 16, 8, 4], 32, 2),
        ] {
            let [n, cin, h, w] = shape;
            let x = values(n * cin * h * w, 3);
            let dy = values(n * cout * h * w, 4);
            let (padded, grads) = (
                channels_last(&x, shape, 1, [h + 2, w + 2]),
                channels_last(&dy, [n, cout, h, w], 0, [h, w]),
            );
            let (th, tw) = (h / 2, w / 2);
            let mut sums = vec![0.0f32; GRADIENT_POINTS * cin * cout];
            // Point rows one at a time, as the threads split them.
            for (first, i) in (0..th)
                .step_by(chunk)
                .flat_map(|f| (0..4).map(move |i| (f, i)))
            {
                let rows = chunk.min(th - first);
                let tiles = n * rows * tw;
                let (v_stride, u_stride) = (point_stride(tiles * cin), point_stride(tiles * cout));
                let mut v = vec![f32::NAN; 4 * v_stride];
                let span = [first, rows];
                gradient_input(
                    &padded,
                    [n, h + 2, w + 2, cin],
                    span,
                    tw,
                    [i, i + 1],
                    &mut v,
                );
                let mut u = vec![f32::NAN; 4 * u_stride];
                gradient_output_grad(&grads, [n, h, w, cout], span, [i, i + 1], &mut u);
                if narrow_in_registers(cin, cout) {
                    let row = &mut sums[4 * i * cin * cout..][..4 * cin * cout];
                    let strides = [[cin, v_stride], [cout, u_stride]];
                    gradient_products(&v, &u, row, [4, tiles, cin, cout], strides);
                    continue;
                }
                for p in 0..4 {
                    for c in 0..cin {
                        for co in 0..cout {
                            for t in 0..tiles {
                                sums[((4 * i + p) * cin + c) * cout + co] +=
                                    u[p * u_stride + t * cout + co] * v[p * v_stride + t * cin + c];
                            }
                        }
                    }
                }
            }
            let ours = weight_gradient_from_points(&sums, [cout, cin]);
            let exact = direct_weight_gradient(&x, shape, &dy, cout);
            for (i, (a, b)) in ours.iter().zip(&exact).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()) * (n * h * w) as f32,
                    "{shape:?}[{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn applies_to_3x3_stride_1_padding_1_and_the_gradient_to_even_outputs() {
        assert!(applies([3, 3], [1, 1], [1, 1]));
        assert!(!applies([3, 3], [2, 2], [1, 1]));
        assert!(!applies([1, 1], [1, 1], [0, 0]));
        assert!(!applies([3, 3], [1, 1], [0, 0]));
        assert!(gradient_applies([3, 3], [1, 1], [1, 1], [32, 32]));
        assert!(gradient_applies([3, 3], [1, 1], [1, 1], [2, 4]));
        assert!(!gradient_applies([3, 3], [1, 1], [1, 1], [9, 9]));
        assert!(!gradient_applies([3, 3], [2, 2], [1, 1], [16, 16]));
    }
}
