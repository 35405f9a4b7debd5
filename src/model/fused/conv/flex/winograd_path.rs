//! The 3x3 stride-1 convolutions by Winograd's minimal filtering ([`winograd`]): the forward
//! (and so the stride-1 input gradient) and the weight gradient, block by block.

use super::geometry::Geometry;
use super::layout::channels_last;
use super::{OutputSums, gemm_into, prefix, with_scratch};
use crate::model::fused::batch_norm::flex::ChannelNorm;
use crate::model::fused::{wide, winograd, written, written_by_runs};
use rayon::prelude::*;

/// Channels times output width from which a convolution takes Winograd (`takes_winograd`);
/// the tests take it everywhere it applies.
#[cfg(not(test))]
pub(super) const WINOGRAD_MIN_WORK: usize = 512;

#[cfg(test)]
pub(super) const WINOGRAD_MIN_WORK: usize = 1;

/// Under `--precision bf16`, the most channels (in or out) at which a 3x3 stride-1
/// convolution still takes f32 Winograd rather than the AMX tiles, in its forward and
/// input gradient, and in its weight gradient (where the flat weight gradient on AMX,
/// `takes_flat_gradient`, does not apply). Timed alone (B = 128, both cores, ms, Winograd
/// vs AMX by im2col): forward 16 channels 2.09 vs 2.60, 32 1.24 vs 1.22, 64 1.11 vs 1.01;
/// weight gradient 16 channels 2.72 vs 6.52, 32 1.69 vs 2.73, 64 at 8x8 2.11 vs 2.21 and at
/// 32x32 24.1 vs 33.3, 128 20.2 vs 17.6 (at 16 output channels the AMX kernel's 32 x 32
/// blocks are half empty).
pub(super) const BF16_WINOGRAD_MAX_CHANNELS: usize = 16;

pub(super) const BF16_WINOGRAD_GRADIENT_MAX_CHANNELS: usize = 64;

/// Sums (16 x C_in x C_out floats) from which a Winograd weight gradient splits the points
/// over the threads rather than the samples (see `winograd_weight_grad`); the tests take
/// both.
#[cfg(not(test))]
pub(super) const WINOGRAD_SPLIT_POINTS_FROM: usize = 1 << 20;

#[cfg(test)]
pub(super) const WINOGRAD_SPLIT_POINTS_FROM: usize = 1000;

/// At most this many tiles per block (from 256: width 1 1.05x).
#[cfg(not(test))]
pub(super) const WINOGRAD_MAX_TILES: usize = 128;

/// At most this many per block of a tile-major forward (`winograd::Layout::TileMajor`):
/// with no gemm call per point to spread, blocks whose transformed tiles stay nearer L1
/// (the step at width 0.25 1.01-1.02x against 128 over three sets of runs; 16 and 64
/// alike).
#[cfg(not(test))]
pub(super) const WINOGRAD_NARROW_MAX_TILES: usize = 32;

#[cfg(test)]
pub(super) const WINOGRAD_MAX_TILES: usize = 3;

#[cfg(test)]
pub(super) const WINOGRAD_NARROW_MAX_TILES: usize = 3;

/// Whether [`convolve`](super::convolve) takes [`winograd_convolve`]. Its transforms and copies
/// cost per value, what it saves grows with the channels: measured, every 3x3 layer of a ResNet-18
/// gains at width 1 (channels x output width 2,048) and, since F(4x4, 3x3), at width 0.25 (512: the
/// step 1.07x; 0.99x with F(2x2, 3x3)). In bf16 only the narrowest layers
/// (`BF16_WINOGRAD_MAX_CHANNELS`): f32 Winograd there beats the AMX tiles.
pub(super) fn takes_winograd(g: &Geometry, bf16: bool) -> bool {
    winograd::applies([g.kh, g.kw], g.stride, g.pad)
        && g.cin.min(g.cout) * g.wo >= WINOGRAD_MIN_WORK
        && (!bf16 || g.cin.max(g.cout) <= BF16_WINOGRAD_MAX_CHANNELS)
}

/// Whether [`weight_grad`](super::weight_grad) takes [`winograd_weight_grad`]: where an f32 forward
/// takes Winograd and the output is even; in bf16, up to `BF16_WINOGRAD_GRADIENT_MAX_CHANNELS`.
pub(super) fn takes_winograd_gradient(g: &Geometry, bf16: bool) -> bool {
    takes_winograd(g, false)
        && winograd::gradient_applies([g.kh, g.kw], g.stride, g.pad, [g.ho, g.wo])
        && (!bf16 || g.cin.max(g.cout) <= BF16_WINOGRAD_GRADIENT_MAX_CHANNELS)
}

/// [`convolve`](super::convolve) of a 3x3, stride-1, padding-1 convolution by Winograd's F(4x4,
/// 3x3) ([`winograd`]): per block of samples (or of tile rows, for large images), the padded input
/// copied channels-last and transformed, 36 single-threaded GEMMs `[C_out, C_in] x [C_in, tiles]`
/// (gemm's, or [`winograd::point_products`]), and their products transformed into the output, whose
/// [`OutputSums`] each block takes then.
pub(super) fn winograd_convolve(
    g: &Geometry,
    xs: &[f32],
    weights: &[f32],
    norm: Option<&ChannelNorm>,
    sums: &OutputSums,
) -> Vec<f32> {
    let (cin, cout, positions) = (g.cin, g.cout, g.positions());
    let (points, tile) = (winograd::POINTS, winograd::TILE);
    let transformed = winograd::transform_weights(weights, [cout, cin]);
    let (th, tw) = (g.ho.div_ceil(tile), g.wo.div_ceil(tile));
    let layout = winograd::Layout::for_channels(cin, cout);
    let max_tiles = match layout {
        winograd::Layout::TileMajor => WINOGRAD_NARROW_MAX_TILES,
        winograd::Layout::PointMajor => WINOGRAD_MAX_TILES,
    };
    let [group, tile_rows] = g.winograd_blocks(tile, points, max_tiles);
    // SAFETY: the output transform writes every slot of its tile rows, and the tile rows
    // cover the block (so it is initialised where its sums read it).
    unsafe {
        written_by_runs(
            g.n * cout * positions,
            group * cout * positions,
            |index, block| {
                let count = block.len() / (cout * positions);
                with_scratch(|scratch| {
                    let (padded, [hp, wp]) = wide(
                        #[inline(always)]
                        || {
                            g.padded_channels_last(
                                xs,
                                [index * group, count],
                                tile,
                                &mut scratch.padded,
                                norm,
                            )
                        },
                    );
                    for first in (0..th).step_by(tile_rows) {
                        let rows = tile_rows.min(th - first);
                        let tiles = count * rows * tw;
                        let inputs = prefix(&mut scratch.columns, layout.len([tiles, cin]));
                        wide(
                            #[inline(always)]
                            || {
                                winograd::transform_input(
                                    padded,
                                    [count, hp, wp, cin],
                                    [first, rows],
                                    tw,
                                    inputs,
                                    layout,
                                )
                            },
                        );
                        let products = prefix(&mut scratch.product, layout.len([tiles, cout]));
                        if layout == winograd::Layout::TileMajor {
                            winograd::point_products(
                                inputs,
                                &transformed,
                                products,
                                [tiles, cin, cout],
                            );
                        } else {
                            let [in_tile, in_point] = layout.strides([tiles, cin]);
                            let [out_tile, out_point] = layout.strides([tiles, cout]);
                            for p in 0..points {
                                gemm_into(
                                    &mut products[p * out_point..],
                                    [1, out_tile],
                                    [cout, tiles, cin],
                                    &transformed[p * cout..],
                                    [1, points * cout],
                                    &inputs[p * in_point..],
                                    [1, in_tile],
                                    false,
                                    gemm::Parallelism::None,
                                );
                            }
                        }
                        wide(
                            #[inline(always)]
                            || {
                                winograd::transform_output(
                                    products,
                                    [count, cout, g.ho, g.wo],
                                    [first, rows],
                                    &mut scratch.band,
                                    block,
                                    layout,
                                )
                            },
                        );
                    }
                });
                // Initialised: the tile rows above wrote every slot of the block.
                sums.add(index * group, written(block));
            },
        )
    }
}

/// [`weight_grad`](super::weight_grad) of a 3x3, stride-1, padding-1 convolution by Winograd's
/// F(3x3, 2x2) ([`winograd::gradient_output_grad`]): per block of samples (or of tile rows), the
/// padded input and the output gradient channels-last and transformed, and 16 GEMMs `[C_out, tiles]
/// x [tiles, C_in]` adding into the sums of the 16 points, then transformed into the kernels'
/// gradient. The threads split the blocks, each into sums of its own added at the end; where those
/// would be large (16 x C_in x C_out: 16 MB each at 512 channels, +66 MiB peak memory), they split
/// the points by rows of the 4x4 tile instead (both transforms cost in proportion) into one sum,
/// each transposing every block's input and gradient (measured 0.93x the step with the blocks
/// split, over all layers).
pub(super) fn winograd_weight_grad(
    g: &Geometry,
    xs: &[f32],
    dys: &[f32],
    norm: Option<&ChannelNorm>,
) -> Vec<f32> {
    let (cin, cout, positions) = (g.cin, g.cout, g.positions());
    let (tile, points) = (winograd::GRADIENT_TILE, winograd::GRADIENT_POINTS);
    let (th, tw) = (g.ho / tile, g.wo / tile);
    let [group, tile_rows] = g.winograd_blocks(tile, points, WINOGRAD_MAX_TILES);
    let size = points * cin * cout;
    // Adds point rows `i0..i1` of the blocks of samples from `first` on, `step` apart, into
    // `sum` (those points' sums).
    let accumulate = |sum: &mut [f32], [i0, i1]: [usize; 2], [first, step]: [usize; 2]| {
        let row_points = 4 * (i1 - i0);
        with_scratch(|scratch| {
            for first in (first..g.n).step_by(step) {
                let count = group.min(g.n - first);
                let ((padded, [hp, wp]), grads) = wide(
                    #[inline(always)]
                    || {
                        let padded = g.padded_channels_last(
                            xs,
                            [first, count],
                            tile,
                            &mut scratch.padded,
                            norm,
                        );
                        let grads = channels_last(
                            &dys[first * cout * positions..][..count * cout * positions],
                            [cout, g.ho, g.wo],
                            [0, 0],
                            [g.ho, g.wo],
                            &mut scratch.band,
                            None,
                        );
                        (padded, grads)
                    },
                );
                for first_row in (0..th).step_by(tile_rows) {
                    let rows = tile_rows.min(th - first_row);
                    let tiles = count * rows * tw;
                    let (in_stride, grad_stride) = (
                        winograd::point_stride(tiles * cin),
                        winograd::point_stride(tiles * cout),
                    );
                    let inputs = prefix(&mut scratch.columns, row_points * in_stride);
                    let transformed = prefix(&mut scratch.product, row_points * grad_stride);
                    wide(
                        #[inline(always)]
                        || {
                            let span = [first_row, rows];
                            let shape = [count, hp, wp, cin];
                            winograd::gradient_input(padded, shape, span, tw, [i0, i1], inputs);
                            let shape = [count, g.ho, g.wo, cout];
                            winograd::gradient_output_grad(
                                grads,
                                shape,
                                span,
                                [i0, i1],
                                transformed,
                            );
                        },
                    );
                    if winograd::narrow_in_registers(cin, cout) {
                        let strides = [[cin, in_stride], [cout, grad_stride]];
                        let sizes = [row_points, tiles, cin, cout];
                        winograd::gradient_products(inputs, transformed, sum, sizes, strides);
                        continue;
                    }
                    for p in 0..row_points {
                        gemm_into(
                            &mut sum[p * cin * cout..][..cin * cout],
                            [1, cout],
                            [cout, cin, tiles],
                            &transformed[p * grad_stride..][..tiles * cout],
                            [1, cout],
                            &inputs[p * in_stride..][..tiles * cin],
                            [cin, 1],
                            true,
                            gemm::Parallelism::None,
                        );
                    }
                }
            }
        })
    };
    let threads = rayon::current_num_threads();
    if size > WINOGRAD_SPLIT_POINTS_FROM {
        let parts = threads.clamp(1, 4);
        let point_rows = |part: usize| [4 * part / parts, 4 * (part + 1) / parts];
        let mut sums = vec![0.0f32; size];
        let mut shares = Vec::with_capacity(parts);
        let mut rest = &mut sums[..];
        for part in 0..parts {
            let [i0, i1] = point_rows(part);
            let (share, tail) = rest.split_at_mut(4 * (i1 - i0) * cin * cout);
            shares.push(share);
            rest = tail;
        }
        shares
            .into_par_iter()
            .enumerate()
            .for_each(|(part, sum)| accumulate(sum, point_rows(part), [0, group]));
        return winograd::weight_gradient_from_points(&sums, [cout, cin]);
    }
    let parts = threads.clamp(1, g.n.div_ceil(group));
    let mut partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut sum = vec![0.0f32; size];
            accumulate(&mut sum, [0, 4], [part * group, parts * group]);
            sum
        })
        .collect();
    let mut sums = partials.pop().expect("at least one part");
    for other in &partials {
        sums.par_iter_mut().zip(other).for_each(|(s, &o)| *s += o);
    }
    winograd::weight_gradient_from_points(&sums, [cout, cin])
}
