//! flex's [`GemmConvOps`]: [`convolve`] and [`weight_grad`] pick each convolution's path from
//! its [`Geometry`] (im2col on gemm here and in [`split_sums`], the narrow layers'
//! [`direct_path`], the [`winograd_path`], bf16 on the [`amx_path`]); the strided input
//! gradient (`weight^T x dy`, then col2im) is here too. Every path writes its output once and
//! keeps, where a BatchNorm reads that output next, its per-sample sums ([`OutputSums`]).

mod amx_path;
mod direct_path;
mod geometry;
mod layout;
mod split_sums;
mod winograd_path;

use self::amx_path::{
    flat_weight_grad, pack_pair_weights, pack_tap_major_weights, pair_planes_convolve,
    takes_flat_gradient, takes_pair_planes,
};
use self::direct_path::{
    direct_convolve, direct_weight_grad, pointwise_convolve, takes_direct, takes_pointwise,
};
use self::geometry::Geometry;
use self::layout::{reads_a_subsample, spread, subsampled, unstrided};
use self::split_sums::{SumPart, split_weight_grad, transposed_sum};
use self::winograd_path::{
    takes_winograd, takes_winograd_gradient, winograd_convolve, winograd_weight_grad,
};
use super::{GemmConvOps, input_grad_is_a_convolution, on_gemm};
use crate::model::fused::batch_norm::flex::{ChannelNorm, sample_sums};
use crate::model::fused::{
    amx, as_slots, contiguous_f32, direct, filled_by_runs, step_cache, tensor, written,
    written_by_runs,
};
use burn::backend::Flex;
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;
use std::cell::RefCell;

/// Largest weight gradient (floats) whose GEMM sums are split over the threads, each into a
/// partial result of its own (one `[C_out, taps]` per thread, at most 512 KiB: in L2 while
/// each small chunk adds to it): the narrow layers, and in ResNet-18 the 64 -> 128 strided
/// 3x3 and the 256 -> 512 downsample (`byol bench conv`, three rounds alternating, ms:
/// 22.9-24.4 vs 37.6-70.9 and 4.1-5.5 vs 6.0-7.2 with gemm's threading over 8 MB chunks;
/// the 128 -> 256 strided 3x3, whose part is 1.2 MB, did not gain: 31.6-50.5 vs
/// 25.9-34.8). Larger ones use gemm's threading, without the extra memory. In the tests the
/// 1x1 and 3x3 kernels from 4 to 6 channels take the split, the larger ones gemm's
/// threading.
#[cfg(not(test))]
const SPLIT_SUM_MAX_RESULT: usize = 1 << 17;

#[cfg(test)]
const SPLIT_SUM_MAX_RESULT: usize = 300;

/// Output positions per GEMM of a forward convolution (rounded down to whole output rows,
/// or up to whole samples): the tile's im2col (at most 256 x 4608 floats in ResNet-18)
/// stays in L2 between being written and being read. The tests use a small one, so that
/// their images span several tiles.
#[cfg(not(test))]
const TILE_POSITIONS: usize = 256;

/// Output positions (whole samples) per GEMM of a strided f32 input gradient
/// (`weight^T x dy`, then col2im): a sample of 4x4 positions alone fills a quarter of
/// gemm's 64-row microkernel. The tests take two samples of their small images.
#[cfg(not(test))]
const COL2IM_GROUP_POSITIONS: usize = 64;

#[cfg(test)]
const COL2IM_GROUP_POSITIONS: usize = 40;

#[cfg(test)]
const TILE_POSITIONS: usize = 7;

/// The same in bf16 on AMX tiles, where half as many run faster: the bf16 step at width 1
/// 1.04-1.07x against 256 (64: 0.93x, 512: 0.95x), at width 0.25 the same (the f32 step
/// the same at 128, 256 and 512). A tile's packed im2col at 128 channels: 288 KiB.
#[cfg(not(test))]
const BF16_TILE_POSITIONS: usize = 128;

#[cfg(test)]
const BF16_TILE_POSITIONS: usize = 7;

/// A thread's buffers for the tiles of a forward convolution.
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    columns: Vec<f32>,
    product: Vec<f32>,
    /// Winograd: a block's outputs channels-last before their transpose (forward), or its
    /// output gradient channels-last (weight gradient).
    band: Vec<f32>,
    /// In bf16: the padded input in channel pairs, a row of their im2col, the tile packed.
    pairs: Vec<u16>,
    pair_row: Vec<u16>,
    packed: Vec<u16>,
}

thread_local! {
    /// Kept between calls: the tiles of a convolution cost neither an allocation nor fresh
    /// zeroed pages.
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` with this thread's scratch buffers (fresh ones if they are taken, as when a
/// rayon worker that holds them picks up another convolution's job).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The first `len` values of `buffer`, grown (never shrunk) to hold them; their contents
/// are whatever was there before.
fn prefix<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> &mut [T] {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    &mut buffer[..len]
}

/// The output gradients of the samples in `dys` (NCHW) as one `[C_out, S * P]` matrix,
/// each channel's runs side by side: `dys` as it lies for one sample, else copied into
/// `buffer`.
fn side_by_side<'a>(
    dys: &'a [f32],
    [cout, positions]: [usize; 2],
    buffer: &'a mut Vec<f32>,
) -> &'a [f32] {
    let count = dys.len() / (cout * positions);
    if count == 1 {
        return dys;
    }
    let width = count * positions;
    let out = prefix(buffer, cout * width);
    for (s, sample) in dys.chunks_exact(cout * positions).enumerate() {
        for (co, run) in sample.chunks_exact(positions).enumerate() {
            out[co * width + s * positions..][..positions].copy_from_slice(run);
        }
    }
    out
}

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, each matrix given by its row and column
/// strides; `accumulate` adds to `dst` instead of overwriting it. gemm packs `lhs` into
/// panels of rows: cheapest when `lhs` is column-major (`m` contiguous); it reads `rhs`
/// as is, fastest when `k` is contiguous there.
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    dst: &mut [f32],
    [dst_rs, dst_cs]: [usize; 2],
    [m, n, k]: [usize; 3],
    lhs: &[f32],
    [lhs_rs, lhs_cs]: [usize; 2],
    rhs: &[f32],
    [rhs_rs, rhs_cs]: [usize; 2],
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(
        dst.len() > last(m, n, dst_rs, dst_cs),
        "gemm destination out of bounds"
    );
    assert!(
        lhs.len() > last(m, k, lhs_rs, lhs_cs),
        "gemm lhs out of bounds"
    );
    assert!(
        rhs.len() > last(k, n, rhs_rs, rhs_cs),
        "gemm rhs out of bounds"
    );
    // SAFETY: the assertions above keep every index gemm reads or writes in bounds, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl GemmConvOps for Flex {
    /// Samples (or groups of small ones) in parallel; per tile of output positions:
    /// `im2col [tile, taps] x weight^T [taps, C_out]` into `[tile, C_out]`, which is the
    /// NCHW output of one sample (a group's is copied there). The im2col is built
    /// column-major, so that gemm packs it by plain copies, and stays in cache between
    /// being written and being read; the weights are read in their own layout. In bf16 the
    /// same product is `weight [C_out, taps] x im2col [taps, tile]` on AMX tiles, the
    /// weights packed once per call.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<Self> {
        convolve(x, weight, options, bf16, None, Output::Normalised)
    }

    /// Per chunk of samples: `dy [C_out, S * P] x im2col^T [S * P, taps]`, summed into one
    /// `[C_out, taps]` gradient. In bf16: `im2col [taps, S * P] x dy^T [S * P, C_out]` on
    /// AMX tiles, the sum split over the threads.
    fn gemm_conv2d_weight_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        kernel: [usize; 2],
        options: ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<Self> {
        weight_grad(x, output_grad, kernel, &options, bf16, None)
    }

    /// At stride 1, [`convolve`] of `dy` with [`flipped_kernel`]. Otherwise samples in
    /// parallel: `weight^T x dy` into this sample's im2col-shaped gradient,
    /// whose tap rows are added into a padded, phase-split plane (the runs im2col copies
    /// from), which is then cropped (merged back a vector at a time where
    /// [`Geometry::phases_in_vectors`]).
    fn gemm_conv2d_input_grad(
        output_grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        input: [usize; 4],
        options: ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<Self> {
        let ws = weight.layout().shape().clone();
        let kernel = [ws[2], ws[3]];
        let g = Geometry::new(&Shape::new(input), ws[0], kernel, &options);
        if reads_a_subsample(&g) {
            let sub_input = [g.n, g.cin, g.ho, g.wo];
            let sub =
                Self::gemm_conv2d_input_grad(output_grad, weight, sub_input, unstrided(), bf16);
            return spread(&contiguous_f32(&sub), &g);
        }
        if input_grad_is_a_convolution(&options, kernel) {
            // Kept in bf16, where its packing is kept with it; in f32 the copy would add
            // the size of the weights to the peak memory for a cheap flip.
            let flipped = if bf16 {
                let kept =
                    step_cache::derived(&weight, "flipped kernel", || flipped_kernel(&weight));
                FloatTensor::<Flex>::clone(&kept)
            } else {
                flipped_kernel(&weight)
            };
            return convolve(
                output_grad,
                flipped,
                ConvOptions::new(
                    [1, 1],
                    [0, 1].map(|d| kernel[d] - 1 - options.padding_begin()[d]),
                    [1, 1],
                    1,
                ),
                bf16,
                None,
                Output::Gradient,
            );
        }
        let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
        let (dys, weights) = (contiguous_f32(&output_grad), contiguous_f32(&weight));
        // weight^T, `[taps, C_out]`: row `tap` holds that tap's weight for every output
        // channel (the GEMM's `k` contiguous).
        let transposed_row = |tap: usize, row: &mut [f32]| {
            for (co, value) in row.iter_mut().enumerate() {
                *value = weights[co * taps + tap];
            }
        };
        let (kept_weights, transposed) = if bf16 {
            let packed = step_cache::derived(&weight, "transposed A", || {
                amx::OwnedA::packed(|buffer| amx::pack_a_rows(buffer, [taps, cout], transposed_row))
            });
            (Some(packed), Vec::new())
        } else {
            (None, filled_by_runs(taps * cout, cout, transposed_row))
        };
        let packed_weights = kept_weights.as_deref().map(amx::OwnedA::view);
        let [hp, pitch, phase] = g.padded_plane();
        let image = g.cin * g.h * g.w;
        // In f32, samples with few positions go several to a GEMM (see
        // `COL2IM_GROUP_POSITIONS`); on AMX one, whose tiles take 16 positions whole.
        let group = if bf16 {
            1
        } else {
            (COL2IM_GROUP_POSITIONS / positions).clamp(1, g.n)
        };
        let grad = filled_by_runs(g.n * image, group * image, |index, grads| {
            let (first, count) = (index * group, grads.len() / image);
            let width = count * positions;
            let samples = &dys[first * cout * positions..][..count * cout * positions];
            with_scratch(|scratch| {
                // `[taps, S * P]`, the gradient of these samples' im2col.
                let columns = prefix(&mut scratch.columns, taps * width);
                if let Some(weights) = &packed_weights {
                    // One sample (`group` is 1 on AMX).
                    let dy = amx::pack_b_rows(
                        &mut scratch.packed,
                        samples,
                        positions,
                        [cout, positions],
                    );
                    amx::matmul(columns, positions, weights, &dy, false);
                } else {
                    // As its transpose `dy^T [S * P, C_out] x weight [C_out, taps]`,
                    // both operands with `k` contiguous where gemm wants it.
                    let dy = side_by_side(samples, [cout, positions], &mut scratch.product);
                    gemm_into(
                        columns,
                        [1, width],
                        [width, taps, cout],
                        dy,
                        [1, width],
                        &transposed,
                        [1, cout],
                        false,
                        gemm::Parallelism::None,
                    );
                }
                let padded = prefix(&mut scratch.padded, g.cin * hp * pitch);
                let ([ph, pw], sw) = (g.pad, g.stride[1]);
                let merges = g.phases_in_vectors();
                for (s, grad) in grads.chunks_exact_mut(image).enumerate() {
                    padded.fill(0.0);
                    g.add_tap_rows(columns, [width, s * positions], padded);
                    if merges {
                        let planes = padded.chunks_exact(hp * pitch);
                        for (out, plane) in grad.chunks_exact_mut(g.h * g.w).zip(planes) {
                            direct::phase_merge_plane(plane, [g.h, g.w], ph, out);
                        }
                        continue;
                    }
                    // Padded column `x + pw` is value `(x + pw) / sw` of phase `(x + pw) %
                    // sw`: each phase fills the columns `sw` apart from its first.
                    let planes = padded.chunks_exact(hp * pitch);
                    for (out, plane) in grad.chunks_exact_mut(g.h * g.w).zip(planes) {
                        for (y, out) in out.chunks_exact_mut(g.w).enumerate() {
                            let padded_row = &plane[(y + ph) * pitch..][..pitch];
                            for first in 0..sw.min(g.w) {
                                let column = first + pw;
                                let values = &padded_row[column % sw * phase + column / sw..];
                                let outs = out[first..].iter_mut().step_by(sw);
                                for (o, &v) in outs.zip(values) {
                                    *o = v;
                                }
                            }
                        }
                    }
                }
            })
        });
        tensor(grad, Shape::new(input))
    }
}

/// `weight [C_out, C_in, kh, kw]` flipped in space with its in and out channels swapped,
/// `[C_in, C_out, kh, kw]`: the kernel whose stride-1 convolution of the output gradient
/// is the input gradient. Input channels in parallel (burn's `flip` and `swap_dims` make a
/// view that a later copy walks element by element on one thread).
fn flipped_kernel(weight: &FloatTensor<Flex>) -> FloatTensor<Flex> {
    let ws = weight.layout().shape().clone();
    let (cout, cin, window) = (ws[0], ws[1], ws[2] * ws[3]);
    let weights = contiguous_f32(weight);
    let flipped = filled_by_runs(cin * cout * window, cout * window, |ci, out| {
        for (co, kernel) in out.chunks_exact_mut(window).enumerate() {
            let source = &weights[(co * cin + ci) * window..][..window];
            for (o, &v) in kernel.iter_mut().zip(source.iter().rev()) {
                *o = v;
            }
        }
    });
    tensor(flipped, Shape::new([cin, cout, ws[2], ws[3]]))
}

/// What a convolution's output is, and so whether [`convolve`] takes its [`OutputSums`].
#[derive(Clone, Copy, PartialEq)]
pub(in crate::model::fused) enum Output {
    /// Activations, which a BatchNorm reads next: their sums are taken.
    Normalised,
    /// An input gradient (a stride-1 one is a convolution), which no norm reads.
    Gradient,
}

/// [`GemmConvOps::gemm_conv2d`] of `x` normalised by `norm` (when given) as the convolution
/// reads it, `x` itself never normalised in memory.
pub(in crate::model::fused) fn convolve(
    x: FloatTensor<Flex>,
    weight: FloatTensor<Flex>,
    options: ConvOptions<2>,
    bf16: bool,
    norm: Option<&ChannelNorm>,
    output: Output,
) -> FloatTensor<Flex> {
    let ws = weight.layout().shape().clone();
    if !takes_gemm(x.layout().shape(), &ws, &options) {
        let x = match norm {
            Some(norm) => norm.apply_to(&x),
            None => x,
        };
        return <Flex as ModuleOps<Flex>>::conv2d(x, weight, None, options);
    }
    let g = Geometry::new(x.layout().shape(), ws[0], [ws[2], ws[3]], &options);
    if reads_a_subsample(&g) {
        let sub = subsampled(&contiguous_f32(&x), &g);
        return convolve(sub, weight, unstrided(), bf16, norm, output);
    }
    let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
    let xs = contiguous_f32(&x);
    // `[C_out, taps]` row-major: the GEMM's `[taps, C_out]` with `k` contiguous.
    let weights = contiguous_f32(&weight);
    // Every path takes the output's sums while its samples are in cache.
    let sums = OutputSums::new(&g, output);
    let output_shape = Shape::new([g.n, cout, g.ho, g.wo]);
    if takes_pointwise(&g, bf16) {
        let packed = step_cache::derived(&weight, "pointwise weights", || {
            direct::pack_weights(&weights, [cout, g.cin, g.kh * g.kw])
        });
        let values = pointwise_convolve(&g, &xs, &packed, norm, &sums);
        return sums.kept_for(tensor(values, output_shape));
    }
    if takes_direct(&g, bf16) {
        let packed = step_cache::derived(&weight, "direct weights", || {
            direct::pack_weights(&weights, [cout, g.cin, g.kh * g.kw])
        });
        let values = direct_convolve(&g, &xs, &packed, norm, &sums);
        return sums.kept_for(tensor(values, output_shape));
    }
    if takes_winograd(&g, bf16) {
        let values = winograd_convolve(&g, &xs, &weights, norm, &sums);
        return sums.kept_for(tensor(values, output_shape));
    }
    if bf16 && takes_pair_planes(&g) {
        let packed = step_cache::derived(&weight, "tap-major A", || {
            amx::OwnedA::packed(|buffer| pack_tap_major_weights(&g, &weights, buffer))
        });
        let values = pair_planes_convolve(&g, &xs, &packed.view(), norm, &sums);
        return sums.kept_for(tensor(values, output_shape));
    }
    let kept_weights = bf16.then(|| {
        step_cache::derived(&weight, "pair-major A", || {
            amx::OwnedA::packed(|buffer| pack_pair_weights(&g, &weights, buffer))
        })
    });
    let packed_weights = kept_weights.as_deref().map(amx::OwnedA::view);
    // Small images go several to a GEMM, so that its rows fill a tile.
    let tile_positions = if bf16 {
        BF16_TILE_POSITIONS
    } else {
        TILE_POSITIONS
    };
    let group = (tile_positions / positions).clamp(1, g.n);
    // Tiles of whole output rows.
    let tile_rows = (tile_positions / g.wo).clamp(1, g.ho);
    let values = filled_by_runs(
        g.n * cout * positions,
        group * cout * positions,
        |index, block| {
            let count = block.len() / (cout * positions);
            with_scratch(|scratch| {
                let Scratch {
                    padded,
                    columns,
                    product,
                    pairs,
                    pair_row,
                    packed,
                    ..
                } = scratch;
                let samples = [index * group, count];
                let (padded, pairs) = if bf16 {
                    (&[][..], g.padded_pairs(&xs, samples, norm, pairs, padded))
                } else {
                    (g.padded(&xs, samples, padded, false, norm), &[][..])
                };
                for first_row in (0..g.ho).step_by(tile_rows) {
                    let tile_rows = tile_rows.min(g.ho - first_row);
                    let (start, tile) = (first_row * g.wo, tile_rows * g.wo);
                    let (rows, span) = (count * tile, [first_row, tile_rows]);
                    let packed_columns = if bf16 {
                        // In bf16 the im2col goes straight into tile layout, one run
                        // of value pairs per pair of channels and kernel offset.
                        let (planes, window) = (g.cin.div_ceil(2), g.kh * g.kw);
                        let row = prefix(pair_row, 2 * rows);
                        let depth = 2 * planes * window;
                        let mut packing = amx::PackingB::new(packed, [depth, rows]);
                        for pair in 0..planes * window {
                            let (plane, offset) = (pair / window, pair % window);
                            let offset = [offset / g.kw, offset % g.kw];
                            let planes = [plane, planes];
                            g.fill_offset_row(pairs, planes, offset, span, 2, row);
                            packing.interleaved_pair(pair, row);
                        }
                        Some(packing.finish())
                    } else {
                        let columns = prefix(columns, taps * rows);
                        for (tap, row) in columns.chunks_mut(rows).enumerate() {
                            g.fill_tap_row(padded, tap, span, row);
                        }
                        None
                    };
                    let columns = &columns[..];
                    // Into `[C_out, rows]` with rows `row_stride` apart.
                    let gemm = |dst: &mut [f32], row_stride: usize| {
                        if let (Some(weights), Some(tile)) = (&packed_weights, &packed_columns) {
                            amx::matmul(dst, row_stride, weights, tile, false);
                            return;
                        }
                        gemm_into(
                            dst,
                            [1, row_stride],
                            [rows, cout, taps],
                            columns,
                            [1, rows],
                            &weights,
                            [1, taps],
                            false,
                            gemm::Parallelism::None,
                        )
                    };
                    if count == 1 {
                        gemm(&mut block[start..], positions);
                        continue;
                    }
                    let product = prefix(product, rows * cout);
                    gemm(product, rows);
                    for (s, sample) in block.chunks_mut(cout * positions).enumerate() {
                        for (co, out) in sample.chunks_mut(positions).enumerate() {
                            out[start..start + tile]
                                .copy_from_slice(&product[co * rows + s * tile..][..tile]);
                        }
                    }
                }
            });
            sums.add(index * group, block);
        },
    );
    sums.kept_for(tensor(values, output_shape))
}

/// The [`sample_sums`] of a convolution's output, `[N, C_out, positions]`, taken from each
/// sample where it is written, while it is in cache, for the BatchNorm that reads the
/// output next ([`step_cache::remember_sums`]; only while a step's caches are kept, and
/// only of [`Output::Normalised`] outputs).
struct OutputSums {
    sums: Option<std::sync::Mutex<Vec<[f32; 3]>>>,
    cout: usize,
    positions: usize,
}

impl OutputSums {
    fn new(g: &Geometry, output: Output) -> Self {
        let wanted = output == Output::Normalised && step_cache::in_scope();
        let sums = wanted.then(|| vec![[0f32; 3]; g.n * g.cout].into());
        OutputSums {
            sums,
            cout: g.cout,
            positions: g.positions(),
        }
    }

    /// Takes the sums of `outputs`, whole samples from sample `first` on.
    fn add(&self, first: usize, outputs: &[f32]) {
        let Some(all) = &self.sums else {
            return;
        };
        let mut sums = vec![[0f32; 3]; outputs.len() / self.positions];
        let samples = outputs.chunks_exact(self.cout * self.positions);
        for (sums, sample) in sums.chunks_exact_mut(self.cout).zip(samples) {
            sample_sums(sample, self.positions, sums);
        }
        let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
        all[first * self.cout..][..sums.len()].copy_from_slice(&sums);
    }

    /// `output`, its sums kept for its norm.
    fn kept_for(self, output: FloatTensor<Flex>) -> FloatTensor<Flex> {
        if let Some(sums) = self.sums {
            step_cache::remember_sums(
                &output,
                sums.into_inner().unwrap_or_else(|e| e.into_inner()),
            );
        }
        output
    }
}

/// `values` of channel `ch` through `norm` into `scratch` (as long) when there is one, else
/// `values` as they are: a row on its way into a bf16 copy.
fn through_norm<'a>(
    values: &'a [f32],
    norm: Option<&ChannelNorm>,
    ch: usize,
    scratch: &'a mut [f32],
) -> &'a [f32] {
    let Some(norm) = norm else {
        return values;
    };
    let f = norm.channel(ch);
    let scratch = &mut scratch[..values.len()];
    for (o, &v) in scratch.iter_mut().zip(values) {
        *o = f(v, 0.0);
    }
    scratch
}

/// A convolution's output `[N, C_out, positions]` written sample by sample in parallel by
/// `write(s, out)`, each sample's [`OutputSums`] taken right after, while it is in cache.
///
/// # Safety
/// `write` must write every value of the sample it is given.
unsafe fn written_by_samples(
    g: &Geometry,
    sums: &OutputSums,
    write: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let sample = g.cout * g.positions();
    // SAFETY: `write` writes every slot of its sample (the caller's promise).
    unsafe {
        written_by_runs(g.n * sample, sample, |s, out| {
            write(s, out);
            // SAFETY: written just above.
            sums.add(s, written(out));
        })
    }
}

/// Whether [`convolve`] runs on our GEMM for these shapes (else flex's convolution).
fn takes_gemm(x: &Shape, weight: &Shape, options: &ConvOptions<2>) -> bool {
    let fits = (0..2).all(|d| x[2 + d] + 2 * options.padding_begin()[d] >= weight[2 + d]);
    on_gemm(options) && fits
}

/// [`GemmConvOps::gemm_conv2d_weight_grad`] of a convolution of `x` normalised by `norm`
/// (when given), as [`convolve`] computes it.
pub(in crate::model::fused) fn weight_grad(
    x: FloatTensor<Flex>,
    output_grad: FloatTensor<Flex>,
    kernel: [usize; 2],
    options: &ConvOptions<2>,
    bf16: bool,
    norm: Option<&ChannelNorm>,
) -> FloatTensor<Flex> {
    let cout = output_grad.layout().shape()[1];
    let g = Geometry::new(x.layout().shape(), cout, kernel, options);
    if reads_a_subsample(&g) {
        let sub = subsampled(&contiguous_f32(&x), &g);
        return weight_grad(sub, output_grad, kernel, &unstrided(), bf16, norm);
    }
    let (positions, taps) = (g.positions(), g.taps());
    let xs = contiguous_f32(&x);
    let dys = contiguous_f32(&output_grad);
    if bf16 && takes_flat_gradient(&g) {
        let total = flat_weight_grad(&g, &xs, &dys, norm);
        return tensor(total, Shape::new([cout, g.cin, g.kh, g.kw]));
    }
    if takes_direct(&g, bf16) {
        let total = direct_weight_grad(&g, &xs, &dys, norm);
        return tensor(total, Shape::new([cout, g.cin, g.kh, g.kw]));
    }
    if takes_winograd_gradient(&g, bf16) {
        let total = winograd_weight_grad(&g, &xs, &dys, norm);
        return tensor(total, Shape::new([cout, g.cin, g.kh, g.kw]));
    }
    if bf16 || cout * taps <= SPLIT_SUM_MAX_RESULT {
        let total = split_weight_grad(&g, &xs, &dys, norm, bf16);
        return tensor(total, Shape::new([cout, g.cin, g.kh, g.kw]));
    }
    let per_chunk = g.samples_per_chunk();
    // One sum by gemm's threading. `[taps, C_out]`: with the result column-major, gemm packs
    // the smaller `dy`, not the im2col (it would transpose the problem for a row-major
    // result).
    let mut parts = [SumPart::new(taps * cout)];
    // Per call, not per thread: kept, the chunk-sized buffers would add to the peak memory
    // of the whole step (measured: +130 MiB at width 1, no speed gained).
    let mut padded = Vec::new();
    for first in (0..g.n).step_by(per_chunk) {
        let count = per_chunk.min(g.n - first);
        let width = count * positions;
        let padded = g.padded(&xs, [first, count], &mut padded, true, norm);
        // dy of these samples as [C_out, S * P], and their im2col `[taps, S * P]`: new
        // buffers written once by the threads (a zero-fill first was 5% of the width-0.25
        // step on a Zen 3).
        // SAFETY: the runs of `dy` and of the taps cover each of their slots.
        let grads = unsafe {
            written_by_runs(cout * width, width, |co, out| {
                for s in 0..count {
                    let at = ((first + s) * cout + co) * positions;
                    out[s * positions..][..positions]
                        .copy_from_slice(as_slots(&dys[at..at + positions]));
                }
            })
        };
        // SAFETY: `fill_tap_row` writes every value of a tap's row.
        let columns = unsafe {
            written_by_runs(taps * width, width, |tap, row| {
                g.fill_tap_row(as_slots(padded), tap, [0, g.ho], row)
            })
        };
        gemm_into(
            &mut parts[0].sum,
            [1, cout],
            [cout, taps, width],
            &grads,
            [width, 1],
            &columns,
            [1, width],
            true,
            gemm::Parallelism::Rayon(0),
        );
    }
    let total = transposed_sum(&parts, [taps, cout]);
    tensor(total, Shape::new([cout, g.cin, g.kh, g.kw]))
}
