//! The bf16 convolutions on AMX tiles ([`amx`]): weight packing, the forward on planes of
//! channel pairs and the flat weight gradient.

use super::geometry::Geometry;
use super::layout::every_nth;
use super::split_sums::{SumPart, summed_by_threads};
use super::{OutputSums, prefix, through_norm, with_scratch};
use crate::model::fused::batch_norm::flex::ChannelNorm;
use crate::model::fused::{amx, filled_by_runs, transpose16, wide};

/// Bytes of flat operands (input planes and output gradient pairs, bf16) per chunk of a
/// flat weight gradient (`flat_weight_grad`): in L2 while every block of the sum passes
/// over them.
pub(super) const FLAT_CHUNK_BYTES: usize = 1 << 20;

/// Bytes of packed `dy` (B) and of packed im2col rows (A) per step of a bf16 weight
/// gradient by im2col (`add_chunk_on_amx`): B in L2 while every block of taps passes over
/// it. Timed per convolution (`byol bench conv`, least of four rounds, ms, against
/// `[taps, C_out]` sums over chunks of 8 MB of f32 im2col split over the threads): 512
/// channels 12.9 vs 15.8, 256 channels 10.8 vs 12.7, their strided 3x3 9.8 and 8.9 vs 11.3
/// and 10.3; B of 1 MiB and A of 256 KiB 13.7 and 11.2 (deeper chunks: the B panels
/// outgrow L1). The tests take a sample and 32 taps at a time.
#[cfg(not(test))]
pub(super) const AMX_GRADIENT_B_BYTES: usize = 1 << 18;

#[cfg(not(test))]
pub(super) const AMX_GRADIENT_A_BYTES: usize = 1 << 20;

#[cfg(test)]
pub(super) const AMX_GRADIENT_B_BYTES: usize = 1;

#[cfg(test)]
pub(super) const AMX_GRADIENT_A_BYTES: usize = 1;

/// Output rows from which a bf16 weight gradient takes flat positions: the padding columns
/// it sums over as zeros cost 2 / width more products (`byol bench conv`, ms, against the
/// f32 Winograd or the im2col on AMX it replaced: 32 wide, 64 channels 10.1-10.8 vs
/// 22.5-23.4; 16 wide, 128 channels 9.4-10.5 vs 15.7-17.2, 32 channels 1.37-1.42 vs
/// 1.70-1.85; but 8 wide, 256 channels 14.5 vs 11.5, and 4 wide, 512 channels 26.9 vs
/// 15.5). The tests take it at any width.
#[cfg(not(test))]
pub(super) const FLAT_MIN_WIDTH: usize = 16;

#[cfg(test)]
pub(super) const FLAT_MIN_WIDTH: usize = 1;

/// The weights `[C_out, C_in, kh, kw]` packed for AMX with their taps in the channel-pair
/// order of [`Geometry::padded_pairs`]: depth `2 * ((c / 2) * kh * kw + offset) + c % 2`
/// holds channel `c` at kernel offset `offset` (zero for the missing channel of an odd
/// `C_in`).
pub(super) fn pack_pair_weights<'a>(
    g: &Geometry,
    weights: &[f32],
    buffer: &'a mut Vec<u16>,
) -> amx::PackedA<'a> {
    let window = g.kh * g.kw;
    let depth = 2 * g.cin.div_ceil(2) * window;
    pack_weights(
        g,
        weights,
        depth,
        |c, offset| 2 * (c / 2 * window + offset) + c % 2,
        buffer,
    )
}

/// The weights `[C_out, C_in, kh, kw]` packed for AMX as A, `[C_out, depth]`: channel `c`
/// at kernel offset `offset` at depth `at(c, offset)`, zero where no weight lands.
pub(super) fn pack_weights<'a>(
    g: &Geometry,
    weights: &[f32],
    depth: usize,
    at: impl Fn(usize, usize) -> usize + Sync,
    buffer: &'a mut Vec<u16>,
) -> amx::PackedA<'a> {
    let window = g.kh * g.kw;
    amx::pack_a_rows(buffer, [g.cout, depth], |co, row| {
        let kernel = &weights[co * g.cin * window..][..g.cin * window];
        for (c, plane) in kernel.chunks_exact(window).enumerate() {
            for (offset, &v) in plane.iter().enumerate() {
                row[at(c, offset)] = v;
            }
        }
    })
}

/// [`add_chunk_by_gemm`](super::split_sums::add_chunk_by_gemm) on AMX tiles, adding to `part.sum`
/// when `accumulate` (else overwriting it): `dy^T` packed as B once (at most
/// [`AMX_GRADIENT_B_BYTES`]), which every block of taps then reuses from L2, and the im2col rows of
/// a block of taps at a time packed as A straight from the padded input (at most
/// [`AMX_GRADIENT_A_BYTES`]), so that each block of the sum is loaded and stored once per chunk.
pub(super) fn add_chunk_on_amx(
    g: &Geometry,
    [padded, dys]: [&[f32]; 2],
    count: usize,
    part: &mut SumPart,
    accumulate: bool,
) {
    let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
    let depth = count * positions;
    // Column `co`, run `s`: that channel's `dy` in the chunk's sample `s`.
    let grads = amx::pack_b_cols(&mut part.dy, [depth, cout], positions, |co, s| {
        &dys[(s * cout + co) * positions..][..positions]
    });
    let block = (AMX_GRADIENT_A_BYTES / (depth * 2) / 32 * 32).max(32);
    let row = prefix(&mut part.row, depth);
    for first_tap in (0..taps).step_by(block) {
        let block = block.min(taps - first_tap);
        let mut packing = amx::PackingA::new(&mut part.columns, [block, depth]);
        for tap in 0..block {
            g.fill_tap_row(padded, first_tap + tap, [0, g.ho], row);
            packing.row(tap, row);
        }
        let sums = &mut part.sum[first_tap * cout..];
        amx::matmul(sums, cout, &packing.finish(), &grads, accumulate);
    }
}

/// Whether [`weight_grad`](super::weight_grad) in bf16 takes [`flat_weight_grad`]: stride 1,
/// channels in blocks of 32, rows (padded, and of the output) of even length, so that the flat
/// positions pair up within a row, and at least `FLAT_MIN_WIDTH` wide.
pub(super) fn takes_flat_gradient(g: &Geometry) -> bool {
    let width = g.w + 2 * g.pad[1];
    g.stride == [1, 1]
        && amx::weight_gradient_applies(g.cin, g.cout)
        && width.is_multiple_of(2)
        && g.wo.is_multiple_of(2)
        && g.wo >= FLAT_MIN_WIDTH
}

/// [`weight_grad`](super::weight_grad) in bf16 by [`amx::add_weight_gradient`], with no im2col:
/// each thread lays its samples out flat, a chunk at a time (the input as padded bf16 planes,
/// through `norm` as it is copied; `dy` over the same positions, transposed to pairs of positions
/// by 16 x 16 blocks), and sums them into its own `[taps, C_out]` part.
pub(super) fn flat_weight_grad(
    g: &Geometry,
    xs: &[f32],
    dys: &[f32],
    norm: Option<&ChannelNorm>,
) -> Vec<f32> {
    const LANES: usize = 16;
    let (cin, cout, positions) = (g.cin, g.cout, g.positions());
    let [ph, pw] = g.pad;
    let width = g.w + 2 * pw;
    let flat = (g.ho * width).next_multiple_of(2 * LANES);
    let plane = (flat + (g.kh - 1) * width + g.kw - 1).next_multiple_of(2 * LANES);
    let per_sample = (cin * plane + flat * cout) * 2;
    // The flat sums only add (the parts start at zero).
    summed_by_threads(
        g,
        FLAT_CHUNK_BYTES / per_sample,
        |part, [first, count], _| {
            let inputs = prefix(&mut part.columns, count * cin * plane);
            let grads = prefix(&mut part.dy, count * flat * cout);
            let row = prefix(&mut part.row, g.w);
            inputs.fill(0);
            grads.fill(0);
            for (s, planes) in inputs.chunks_exact_mut(cin * plane).enumerate() {
                let image = &xs[(first + s) * cin * g.h * g.w..][..cin * g.h * g.w];
                for (c, out) in planes.chunks_exact_mut(plane).enumerate() {
                    let rows = image[c * g.h * g.w..][..g.h * g.w].chunks_exact(g.w);
                    for (y, values) in rows.enumerate() {
                        let dst = &mut out[(y + ph) * width + pw..][..g.w];
                        amx::to_bf16(through_norm(values, norm, c, row), dst);
                    }
                }
            }
            wide(
                #[inline(always)]
                || {
                    for (s, pairs) in grads.chunks_exact_mut(flat * cout).enumerate() {
                        let grad = &dys[(first + s) * cout * positions..][..cout * positions];
                        for co in (0..cout).step_by(LANES) {
                            for y in 0..g.ho {
                                for x0 in (0..g.wo).step_by(LANES) {
                                    let nx = LANES.min(g.wo - x0);
                                    let mut block = [[0f32; LANES]; LANES];
                                    for (k, values) in block.iter_mut().enumerate() {
                                        let at = (co + k) * positions + y * g.wo + x0;
                                        values[..nx].copy_from_slice(&grad[at..at + nx]);
                                    }
                                    transpose16(&mut block);
                                    for m in (0..nx).step_by(2) {
                                        let f = y * width + x0 + m;
                                        let out =
                                            &mut pairs[(f / 2 * cout + co) * 2..][..2 * LANES];
                                        amx::interleave_runs(&block[m], &block[m + 1], out);
                                    }
                                }
                            }
                        }
                    }
                },
            );
            let operands = amx::FlatGradient {
                inputs,
                grads,
                plane,
                flat,
                width,
                samples: count,
            };
            amx::add_weight_gradient(&operands, [cin, cout], [g.kh, g.kw], &mut part.sum);
        },
    )
}

/// Whether [`convolve`](super::convolve) in bf16 takes [`pair_planes_convolve`]: sizes as
/// [`amx::pair_planes_apply`] allows, the same stride both ways (stride 2: the 64 -> 128
/// 3x3 of a width-1 ResNet-18, its rows of 16; per convolution 10.9-11.7 ms by im2col).
pub(super) fn takes_pair_planes(g: &Geometry) -> bool {
    g.stride[0] == g.stride[1] && amx::pair_planes_apply(g.cin, g.cout, [g.ho, g.wo])
}

/// [`convolve`](super::convolve) in bf16 by [`amx::convolve_pair_planes`], sample by sample: the
/// input copied into padded planes of channel pairs in bf16 (through `norm` as it is copied; split
/// into the `stride x stride` phases of the padded positions when strided) and convolved where it
/// lies, with no im2col; the products land in the NCHW output as they are.
pub(super) fn pair_planes_convolve(
    g: &Geometry,
    xs: &[f32],
    packed: &amx::PackedA,
    norm: Option<&ChannelNorm>,
    sums: &OutputSums,
) -> Vec<f32> {
    let (cin, cout, s) = (g.cin, g.cout, g.stride[0]);
    let [ph, pw] = g.pad;
    // Each phase `[hq, wq]`: every padded position that a tap reads.
    let [hq, wq] = [(g.h + 2 * ph).div_ceil(s), (g.w + 2 * pw).div_ceil(s)];
    let (image, outputs, phase) = (cin * g.h * g.w, cout * g.positions(), hq * wq * 2);
    let columns = g.column_phases();
    filled_by_runs(g.n * outputs, outputs, |sample, out| {
        with_scratch(|scratch| {
            let input = prefix(&mut scratch.pairs, cin / 2 * s * s * phase);
            input.fill(0);
            let rows = prefix(&mut scratch.padded, 4 * g.w);
            let (normed, picked) = rows.split_at_mut(2 * g.w);
            let (first, second) = normed.split_at_mut(g.w);
            let planes = xs[sample * image..][..image].chunks_exact(g.h * g.w);
            let channel_pairs = planes.clone().step_by(2).zip(planes.skip(1).step_by(2));
            for (p, ((a, b), pairs)) in channel_pairs
                .zip(input.chunks_exact_mut(s * s * phase))
                .enumerate()
            {
                for (y, (a, b)) in a.chunks_exact(g.w).zip(b.chunks_exact(g.w)).enumerate() {
                    let a = through_norm(a, norm, 2 * p, first);
                    let b = through_norm(b, norm, 2 * p + 1, second);
                    let (qy, row_phase) = ((y + ph) / s, (y + ph) % s);
                    if s == 1 {
                        let out = &mut pairs[(qy * wq + pw) * 2..][..2 * g.w];
                        amx::interleave_runs(a, b, out);
                        continue;
                    }
                    for (b_phase, &[qx, x0, count]) in columns.iter().enumerate() {
                        let (ga, gb) = picked.split_at_mut(g.w);
                        let (ga, gb) = (&mut ga[..count], &mut gb[..count]);
                        every_nth(ga, &a[x0..], s, |v| v);
                        every_nth(gb, &b[x0..], s, |v| v);
                        let plane = (row_phase * s + b_phase) * phase;
                        let out = &mut pairs[plane + (qy * wq + qx) * 2..][..2 * count];
                        amx::interleave_runs(ga, gb, out);
                    }
                }
            }
            amx::convolve_pair_planes(
                input,
                [hq, wq, cin],
                s,
                [g.kh, g.kw],
                [g.ho, g.wo],
                packed,
                out,
            );
            sums.add(sample, out);
        })
    })
}

/// The weights `[C_out, C_in, kh, kw]` packed for AMX as `[C_out, taps * C_in]`, the depth
/// tap-major (`(i * kw + j) * C_in + c`): the A of [`pair_planes_convolve`].
pub(super) fn pack_tap_major_weights<'a>(
    g: &Geometry,
    weights: &[f32],
    buffer: &'a mut Vec<u16>,
) -> amx::PackedA<'a> {
    let cin = g.cin;
    pack_weights(
        g,
        weights,
        g.kh * g.kw * cin,
        |c, tap| tap * cin + c,
        buffer,
    )
}
