//! Bias-free 2-D convolution on GEMM for flex training: forward, input and weight gradients.
//!
//! - Forward: samples (or groups of small ones) in parallel, each in tiles of whole output
//!   rows whose im2col stays in cache for its single-threaded GEMM. The im2col is built
//!   positions-contiguous from a zero-padded copy of the sample (one plain run per tap and
//!   output row), which gemm packs by plain copies; the result lands in the NCHW output
//!   directly. flex's own convolution does the same GEMMs but converts the input to NHWC on one
//!   thread and writes its output one strided element at a time.
//! - Input gradient: burn 0.22's default runs `conv_transpose2d`, which flex computes as a
//!   direct loop. For the stride-1 convolutions that make up most of a ResNet the input gradient
//!   *is* a convolution, of the output gradient with the kernel flipped in space and its in/out
//!   channels swapped, padded by `k - 1 - p`: it takes the forward above. Strided convolutions
//!   compute `weight^T x dy` per sample (the gradient of its im2col; in f32, samples of few
//!   positions several to a GEMM) and add each tap's row back where im2col copied it from
//!   (col2im).
//! - Weight gradient: `dy [C_out, N*P] x im2col(x)^T`, the same im2col over whole samples,
//!   into a column-major result so that gemm packs the small `dy` rather than the im2col.
//! - In bf16 (`--precision bf16` on a CPU with AMX; without AMX it takes the f32 path) the
//!   same three products run on [`super::amx`] tiles: the forward's im2col is built from the
//!   input converted once to bf16 with its channels interleaved in pairs, so that each row of
//!   a tile is one copied run; the weight gradient packs its im2col rows straight into tile
//!   layout, its samples split over the threads.
//!
//! GEMM is the `gemm` crate flex itself uses, called directly for strides and accumulation.
//! burn's `Conv2d` module keeps the parameters; [`forward`] replaces its forward.

use burn::backend::backend_extension;
use burn::backend::ops::ConvOptions;
use burn::backend::tensor::FloatTensor;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use crate::model::precision;

#[backend_extension(Flex, Autodiff)]
pub trait GemmConvOps: burn::backend::Backend {
    /// `conv2d(x, weight)` without bias; with `bf16`, its GEMMs on bf16 AMX tiles
    /// ([`super::amx`], which must be available) with f32 sums.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<Self>;

    /// The weight gradient of [`gemm_conv2d`](GemmConvOps::gemm_conv2d) (no groups, no
    /// dilation, symmetric padding): `dy` as `[C_out, N*P]` times `im2col(x)` as
    /// `[N*P, C_in*kh*kw]`, one GEMM per chunk of samples; `bf16` as in `gemm_conv2d`.
    fn gemm_conv2d_weight_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        kernel: [usize; 2],
        options: ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<Self>;

    /// The input gradient of [`gemm_conv2d`](GemmConvOps::gemm_conv2d) (no groups, no
    /// dilation, symmetric padding; any stride): at stride 1 the convolution of `dy` with the
    /// kernel flipped; else `weight^T [taps, C_out] x dy [C_out, P]` per sample, then each
    /// tap's row added back where im2col took it from; `bf16` as in `gemm_conv2d`.
    fn gemm_conv2d_input_grad(
        output_grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        input: [usize; 4],
        options: ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<Self>;
}

/// `conv` applied to an NCHW batch: through [`GemmConvOps`] on flex with f32 tensors and no
/// bias (under a bf16 autocast scope with bf16 GEMMs where the CPU has AMX, with f32 ones where
/// it has not), as `precision::conv2d` otherwise.
pub fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let Some((options, bf16)) = gemm_path(conv, &x) else {
        return precision::conv2d(conv, x);
    };
    record(conv, &x, &options, bf16);
    Tensor::from_dispatch(<burn::backend::Dispatch as GemmConvOps>::gemm_conv2d(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        options,
        bf16,
    ))
}

/// The options `conv` takes our path with, and whether in bf16; `None` where it does not.
/// Without AMX a bf16 scope takes our f32 GEMMs: burn's bf16 convolution, the alternative,
/// ran the step at a quarter of the f32 step's speed (`Precision::notice` says so to the user).
pub(super) fn gemm_path(conv: &Conv2d, x: &Tensor<4>) -> Option<(ConvOptions<2>, bool)> {
    let options = precision::conv_options(conv)?;
    let bf16 = match precision::compute_dtype() {
        None => false,
        Some(burn::tensor::FloatDType::BF16) => super::amx::available(),
        Some(_) => return None,
    };
    let ours = super::enabled()
        && conv.bias.is_none()
        && x.dtype() == burn::tensor::DType::F32
        && super::is_flex(&x.device());
    ours.then_some((options, bf16))
}

/// Notes that `conv` runs on our path on `x` when a [`recording`] is on (each caller that
/// then runs it, once).
pub(super) fn record(conv: &Conv2d, x: &Tensor<4>, options: &ConvOptions<2>, bf16: bool) {
    RECORDING.with_borrow_mut(|recorded| {
        if let Some(recorded) = recorded {
            recorded.push(Recorded {
                input: x.dims(),
                weight: conv.weight.dims(),
                options: options.clone(),
                bf16,
            });
        }
    });
}

/// A convolution that took our path, as [`recording`] saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub input: [usize; 4],
    pub weight: [usize; 4],
    pub options: ConvOptions<2>,
    pub bf16: bool,
}

thread_local! {
    static RECORDING: std::cell::RefCell<Option<Vec<Recorded>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns, with its result, every convolution that took our path on this
/// thread while it ran, in order (`byol bench conv` times them one by one).
pub fn recording<R>(f: impl FnOnce() -> R) -> (R, Vec<Recorded>) {
    let outer = RECORDING.replace(Some(Vec::new()));
    let result = f();
    let recorded = RECORDING.replace(outer).unwrap_or_default();
    (result, recorded)
}

/// Whether our GEMM convolution and weight gradient handle these options (flex's convolution
/// and burn's weight gradient take the rest).
pub(super) fn on_gemm(options: &ConvOptions<2>) -> bool {
    options.dilation == [1, 1] && options.groups == 1 && !options.is_asymmetric()
}

/// Whether the input gradient of a convolution with these options is a plain convolution.
fn input_grad_is_a_convolution(options: &ConvOptions<2>, kernel: [usize; 2]) -> bool {
    options.stride == [1, 1]
        && options.dilation == [1, 1]
        && options.groups == 1
        && !options.is_asymmetric()
        && (0..2).all(|i| options.padding_begin()[i] < kernel[i])
}

pub(super) mod flex {
    use super::super::batch_norm::flex::{ChannelNorm, sample_sums};
    use super::super::{
        amx, as_slots, contiguous_f32, direct, filled_by_runs, step_cache, tensor, transpose16,
        wide, winograd, written, written_by_runs,
    };
    use super::{GemmConvOps, input_grad_is_a_convolution, on_gemm};
    use burn::backend::Flex;
    use burn::backend::ops::{ConvOptions, ModuleOps};
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::Shape;
    use rayon::prelude::*;
    use std::cell::RefCell;

    /// Floats per im2col chunk of a weight gradient (8 MB): bounds its extra memory, and the
    /// zero-fill of its fresh buffers once per call (at 32 MB that fill was 4% of the width-0.25
    /// step). The tests use a tiny one, so that their small batches run in several chunks.
    #[cfg(not(test))]
    const CHUNK_FLOATS: usize = 2 << 20;
    #[cfg(test)]
    const CHUNK_FLOATS: usize = 1000;

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

    /// Floats of im2col per chunk of an f32 weight gradient split over the threads
    /// (`add_chunk_by_gemm`): in L2 with the chunk's `dy` while gemm reads them. Timed per
    /// convolution at width 0.25 (least of four rounds, ms) against chunks of 8 MB for all
    /// threads: the stem 1.39 vs 2.18, the strided 3x3 2.35 and 1.99 vs 3.53 and 2.40 (1 MB
    /// chunks: 1.65, 2.79, 1.92). The tests take one or two samples.
    #[cfg(not(test))]
    const SPLIT_CHUNK_FLOATS: usize = 1 << 16;
    #[cfg(test)]
    const SPLIT_CHUNK_FLOATS: usize = 1200;
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
    /// The most channels on its narrower side (in or out) at which a 3x3 convolution takes the
    /// direct kernels (`takes_direct`) rather than Winograd: in the width-0.25
    /// step, the 32-channel layers' forwards took 2.5-2.6 ms a call direct against 1.9-2.2
    /// by Winograd.
    const DIRECT_MAX_CHANNELS: usize = 16;
    /// Multiply-adds per sample up to which a 1x1 convolution takes
    /// [`direct::pointwise_sample`] instead of gemm. The downsamples of a width-0.25 ResNet-18
    /// (128 Ki each, forward and input gradient) gain (`byol bench conv`: 16 -> 32 forward
    /// 0.60-0.66 -> 0.45 ms with the subsample, 32 -> 64 0.44-0.48 -> 0.29-0.31, input gradients
    /// 0.75-0.89 -> 0.53-0.62 and 0.42-0.44 -> 0.32-0.35); width 1's (2 Mi) ran no faster.
    const POINTWISE_MAX_WORK: usize = 1 << 18;
    /// Channels times output width from which a convolution takes Winograd (`takes_winograd`);
    /// the tests take it everywhere it applies.
    #[cfg(not(test))]
    const WINOGRAD_MIN_WORK: usize = 512;
    #[cfg(test)]
    const WINOGRAD_MIN_WORK: usize = 1;
    /// Under `--precision bf16`, the most channels (in or out) at which a 3x3 stride-1
    /// convolution still takes f32 Winograd rather than the AMX tiles, in its forward and
    /// input gradient, and in its weight gradient (where the flat weight gradient on AMX,
    /// `takes_flat_gradient`, does not apply). Timed alone (B = 128, both cores, ms, Winograd
    /// vs AMX by im2col): forward 16 channels 2.09 vs 2.60, 32 1.24 vs 1.22, 64 1.11 vs 1.01;
    /// weight gradient 16 channels 2.72 vs 6.52, 32 1.69 vs 2.73, 64 at 8x8 2.11 vs 2.21 and at
    /// 32x32 24.1 vs 33.3, 128 20.2 vs 17.6 (at 16 output channels the AMX kernel's 32 x 32
    /// blocks are half empty).
    const BF16_WINOGRAD_MAX_CHANNELS: usize = 16;
    const BF16_WINOGRAD_GRADIENT_MAX_CHANNELS: usize = 64;
    /// Sums (16 x C_in x C_out floats) from which a Winograd weight gradient splits the points
    /// over the threads rather than the samples (see `winograd_weight_grad`); the tests take
    /// both.
    #[cfg(not(test))]
    const WINOGRAD_SPLIT_POINTS_FROM: usize = 1 << 20;
    #[cfg(test)]
    const WINOGRAD_SPLIT_POINTS_FROM: usize = 1000;
    /// Bytes of flat operands (input planes and output gradient pairs, bf16) per chunk of a
    /// flat weight gradient (`flat_weight_grad`): in L2 while every block of the sum passes
    /// over them.
    const FLAT_CHUNK_BYTES: usize = 1 << 20;
    /// Bytes of packed `dy` (B) and of packed im2col rows (A) per step of a bf16 weight
    /// gradient by im2col (`add_chunk_on_amx`): B in L2 while every block of taps passes over
    /// it. Timed per convolution (`byol bench conv`, least of four rounds, ms, against
    /// `[taps, C_out]` sums over chunks of 8 MB of f32 im2col split over the threads): 512
    /// channels 12.9 vs 15.8, 256 channels 10.8 vs 12.7, their strided 3x3 9.8 and 8.9 vs 11.3
    /// and 10.3; B of 1 MiB and A of 256 KiB 13.7 and 11.2 (deeper chunks: the B panels
    /// outgrow L1). The tests take a sample and 32 taps at a time.
    #[cfg(not(test))]
    const AMX_GRADIENT_B_BYTES: usize = 1 << 18;
    #[cfg(not(test))]
    const AMX_GRADIENT_A_BYTES: usize = 1 << 20;
    #[cfg(test)]
    const AMX_GRADIENT_B_BYTES: usize = 1;
    #[cfg(test)]
    const AMX_GRADIENT_A_BYTES: usize = 1;
    /// Output rows from which a bf16 weight gradient takes flat positions: the padding columns
    /// it sums over as zeros cost 2 / width more products (`byol bench conv`, ms, against the
    /// f32 Winograd or the im2col on AMX it replaced: 32 wide, 64 channels 10.1-10.8 vs
    /// 22.5-23.4; 16 wide, 128 channels 9.4-10.5 vs 15.7-17.2, 32 channels 1.37-1.42 vs
    /// 1.70-1.85; but 8 wide, 256 channels 14.5 vs 11.5, and 4 wide, 512 channels 26.9 vs
    /// 15.5). The tests take it at any width.
    #[cfg(not(test))]
    const FLAT_MIN_WIDTH: usize = 16;
    #[cfg(test)]
    const FLAT_MIN_WIDTH: usize = 1;
    /// Transformed values (all points, all channels: 4 MB) a Winograd block aims at (see
    /// `Geometry::winograd_blocks`).
    const WINOGRAD_VALUES: usize = 1 << 20;
    #[cfg(not(test))]
    const WINOGRAD_MIN_TILES: usize = 64;
    /// At most this many tiles per block (from 256: width 1 1.05x).
    #[cfg(not(test))]
    const WINOGRAD_MAX_TILES: usize = 128;
    /// At most this many per block of a tile-major forward (`winograd::Layout::TileMajor`):
    /// with no gemm call per point to spread, blocks whose transformed tiles stay nearer L1
    /// (the step at width 0.25 1.01-1.02x against 128 over three sets of runs; 16 and 64
    /// alike).
    #[cfg(not(test))]
    const WINOGRAD_NARROW_MAX_TILES: usize = 32;
    /// In the tests, a few tiles per GEMM, so that their images span several.
    #[cfg(test)]
    const WINOGRAD_MIN_TILES: usize = 2;
    #[cfg(test)]
    const WINOGRAD_MAX_TILES: usize = 3;
    #[cfg(test)]
    const WINOGRAD_NARROW_MAX_TILES: usize = 3;

    /// Shapes of one convolution over an NCHW batch.
    #[derive(Clone, Copy)]
    struct Geometry {
        n: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        kh: usize,
        kw: usize,
        stride: [usize; 2],
        pad: [usize; 2],
        ho: usize,
        wo: usize,
    }

    impl Geometry {
        fn new(x: &Shape, cout: usize, [kh, kw]: [usize; 2], options: &ConvOptions<2>) -> Self {
            let (n, cin, h, w) = (x[0], x[1], x[2], x[3]);
            let [sh, sw] = options.stride;
            let [ph, pw] = options.padding_begin();
            Geometry {
                n,
                cin,
                h,
                w,
                cout,
                kh,
                kw,
                stride: options.stride,
                pad: [ph, pw],
                ho: (h + 2 * ph - kh) / sh + 1,
                wo: (w + 2 * pw - kw) / sw + 1,
            }
        }

        fn positions(&self) -> usize {
            self.ho * self.wo
        }

        fn taps(&self) -> usize {
            self.cin * self.kh * self.kw
        }

        /// Samples whose im2col fits in one chunk.
        fn samples_per_chunk(&self) -> usize {
            (CHUNK_FLOATS / (self.positions() * self.taps()).max(1)).clamp(1, self.n)
        }

        /// The padded copy of one input plane as `[H + 2 * pad_h, pitch]` with its row length
        /// `W + 2 * pad_w` split into `stride_w` phases of `phase` values each (columns `x` with
        /// `x % stride_w == p` together, in order): every kernel tap then reads a contiguous run
        /// of each row, whatever the stride. Returns `[rows, pitch, phase]`.
        fn padded_plane(&self) -> [usize; 3] {
            let sw = self.stride[1];
            let phase = (self.w + 2 * self.pad[1]).div_ceil(sw);
            [self.h + 2 * self.pad[0], sw * phase, phase]
        }

        /// Per column phase `p` of a padded row (padded columns `p, p + stride, ...`), the same
        /// in every row: `[skip, first, count]`, its `skip` values of padding before the
        /// image, then `count` input columns `first, first + stride, ...`.
        fn column_phases(&self) -> Vec<[usize; 3]> {
            let ([_, pw], [_, sw], w) = (self.pad, self.stride, self.w);
            (0..sw)
                .map(|p| {
                    let skip = pw.saturating_sub(p).div_ceil(sw);
                    let first = skip * sw + p - pw;
                    [skip, first.min(w), w.saturating_sub(first).div_ceil(sw)]
                })
                .collect()
        }

        /// Samples `first..first + count` padded and phase-split ([`Self::padded_plane`]), so
        /// that im2col copies plain runs without bounds checks, and normalised by `norm` when
        /// given: a slice of `xs` when there is nothing to do, else a copy in `buffer` (samples
        /// in parallel when `parallel`).
        fn padded<'a>(
            &self,
            xs: &'a [f32],
            [first, count]: [usize; 2],
            buffer: &'a mut Vec<f32>,
            parallel: bool,
            norm: Option<&ChannelNorm>,
        ) -> &'a [f32] {
            let image = self.cin * self.h * self.w;
            if norm.is_none() && self.pad == [0, 0] && self.stride[1] == 1 {
                return &xs[first * image..][..count * image];
            }
            let [hp, pitch, _] = self.padded_plane();
            let padded_image = self.cin * hp * pitch;
            if parallel {
                // A new buffer made by the threads: growing `buffer` would zero it on this one.
                *buffer = filled_by_runs(count * padded_image, padded_image, |s, out| {
                    self.pad_samples(xs, first + s, out, norm)
                });
                return buffer;
            }
            let padded = prefix(buffer, count * padded_image);
            self.pad_samples(xs, first, padded, norm);
            padded
        }

        /// Whether the padded planes' column phases are split ([`Self::pad_samples`]) and
        /// merged back (the strided input gradient) a vector at a time: stride 2 with one
        /// column of padding and rows of an even width, on AVX-512
        /// ([`direct::phase_split_plane`], [`direct::phase_merge_plane`]).
        fn phases_in_vectors(&self) -> bool {
            self.stride[1] == 2 && self.pad[1] == 1 && direct::splits_phases(self.w)
        }

        /// Copies samples `first..` (`padded.len()` holds as many) into `padded`, padded and
        /// phase-split, each value through `norm` when given (the padding stays zero: it pads
        /// the normalised input); a vector at a time where [`Self::phases_in_vectors`].
        fn pad_samples(
            &self,
            xs: &[f32],
            first: usize,
            padded: &mut [f32],
            norm: Option<&ChannelNorm>,
        ) {
            let (h, w) = (self.h, self.w);
            let [hp, pitch, _] = self.padded_plane();
            let planes = xs[first * self.cin * h * w..].chunks_exact(h * w);
            let padded = padded.chunks_exact_mut(hp * pitch);
            if self.phases_in_vectors() {
                for (plane, (out, image)) in padded.zip(planes).enumerate() {
                    let c = plane % self.cin;
                    let affine = norm.map(|norm| (norm.affine(c), norm.relu()));
                    direct::phase_split_plane(image, [h, w], self.pad[0], affine, out);
                }
                return;
            }
            let phase_runs = self.column_phases();
            for (plane, (out, image)) in padded.zip(planes).enumerate() {
                let norm = norm.map(|norm| norm.channel(plane % self.cin));
                self.pad_plane(image, norm, &phase_runs, out);
            }
        }

        /// One input plane (`[H, W]`) into `out` as [`Self::pad_samples`] lays each out, each
        /// value through `norm` when given; `phase_runs` are [`Self::column_phases`].
        #[inline(always)]
        fn pad_plane(
            &self,
            image: &[f32],
            norm: Option<impl Fn(f32, f32) -> f32>,
            phase_runs: &[[usize; 3]],
            out: &mut [f32],
        ) {
            let Geometry {
                h,
                w,
                kh,
                kw,
                pad: [ph, pw],
                stride: [sh, sw],
                ..
            } = *self;
            let [_, pitch, phase] = self.padded_plane();
            // Rows and phases no tap reads (a 1x1 kernel at stride 2 reads a quarter of the
            // input) are left as they are.
            let row_read = |row: usize| kh >= sh || row % sh < kh;
            let phase_runs = &phase_runs[..kw.min(sw)];
            out[..ph * pitch].fill(0.0);
            out[(ph + h) * pitch..].fill(0.0);
            let rows = out[ph * pitch..(ph + h) * pitch].chunks_exact_mut(pitch);
            for (y, (out, input)) in rows.zip(image.chunks_exact(w)).enumerate() {
                if !row_read(ph + y) {
                    continue;
                }
                if sw == 1 {
                    out[..pw].fill(0.0);
                    match &norm {
                        None => out[pw..pw + w].copy_from_slice(input),
                        Some(f) => {
                            for (o, &v) in out[pw..pw + w].iter_mut().zip(input) {
                                *o = f(v, 0.0);
                            }
                        }
                    }
                    out[pw + w..].fill(0.0);
                } else {
                    let phases = out.chunks_exact_mut(phase).zip(phase_runs);
                    for (values, &[skip, first_input, count]) in phases {
                        values[..skip].fill(0.0);
                        values[skip + count..].fill(0.0);
                        let values = &mut values[skip..skip + count];
                        let inputs = &input[first_input..];
                        match &norm {
                            None => every_nth(values, inputs, sw, |v| v),
                            Some(f) => every_nth(values, inputs, sw, |v| f(v, 0.0)),
                        }
                    }
                }
            }
        }

        /// The blocks of a Winograd convolution or weight gradient, `[samples, tile rows]`: a
        /// block of several samples for small images, else of some tile rows of one sample.
        /// Tiles per block: enough that each pass over the weights does much work (at least
        /// 64), few enough that the transformed tiles (`points x C x tiles`, for the wider of
        /// C_in and C_out) stay near 4 MB and at most `max_tiles` ([`WINOGRAD_MAX_TILES`],
        /// [`WINOGRAD_NARROW_MAX_TILES`]), and no more than a thread's share, so that the small
        /// images of the deep layers (a tile or four each) still make a block for every thread
        /// (width 0.25 1.05x, width 1 1.02x).
        fn winograd_blocks(&self, tile: usize, points: usize, max_tiles: usize) -> [usize; 2] {
            let (th, tw) = (self.ho.div_ceil(tile), self.wo.div_ceil(tile));
            let tiles = (WINOGRAD_VALUES / (points * self.cin.max(self.cout)))
                .clamp(WINOGRAD_MIN_TILES.min(max_tiles), max_tiles);
            let balanced = (self.n * th * tw).div_ceil(rayon::current_num_threads());
            let tiles = tiles.min(balanced.max(1));
            [
                (tiles / (th * tw)).clamp(1, self.n),
                (tiles / tw).clamp(1, th),
            ]
        }

        /// Samples `first..first + count` padded for a Winograd convolution with channels last
        /// and `tile x tile` output tiles (`[count, hp, wp, C_in]`: padding 1 before, and after
        /// out to whole tiles), each value through `norm` when given. Returns them and `[hp,
        /// wp]`.
        #[inline(always)]
        fn padded_channels_last<'a>(
            &self,
            xs: &[f32],
            [first, count]: [usize; 2],
            tile: usize,
            buffer: &'a mut Vec<f32>,
            norm: Option<&ChannelNorm>,
        ) -> (&'a [f32], [usize; 2]) {
            let Geometry { cin, h, w, pad, .. } = *self;
            let image = cin * h * w;
            let padded = [
                tile * self.ho.div_ceil(tile) + 2,
                tile * self.wo.div_ceil(tile) + 2,
            ];
            let values = channels_last(
                &xs[first * image..][..count * image],
                [cin, h, w],
                pad,
                padded,
                buffer,
                norm,
            );
            (values, padded)
        }

        /// Fills `row` with kernel tap `tap = (c, i, j)` at output rows `first_row..first_row +
        /// rows` of the padded samples in `padded` (`row.len() / (rows * W_out)` of them): each
        /// value is the input under that tap at one output position. The rows of all taps make
        /// the im2col `[taps, samples * positions]`, positions contiguous, which GEMM reads as
        /// is; each output row is a copy of one run of a padded input row.
        fn fill_tap_row<T: Copy>(&self, padded: &[T], tap: usize, span: [usize; 2], row: &mut [T]) {
            let (kh, kw) = (self.kh, self.kw);
            let (c, offset) = (tap / (kh * kw), [tap / kw % kh, tap % kw]);
            self.fill_offset_row(padded, [c, self.cin], offset, span, 1, row);
        }

        /// As [`Self::fill_tap_row`] for plane `plane` of `planes` per sample, kernel offset
        /// `(i, j)`, in padded planes of `lanes` values per position (2: [`Self::padded_pairs`]).
        fn fill_offset_row<T: Copy>(
            &self,
            padded: &[T],
            [plane, planes]: [usize; 2],
            [i, j]: [usize; 2],
            [first_row, rows]: [usize; 2],
            lanes: usize,
            row: &mut [T],
        ) {
            let Geometry {
                stride: [sh, sw],
                wo,
                ..
            } = *self;
            let [hp, pitch, phase] = self.padded_plane();
            // Column `ox * sw + j` of a padded row is value `ox + j / sw` of phase `j % sw`.
            let start = ((first_row * sh + i) * pitch + j % sw * phase + j / sw) * lanes;
            let plane_len = hp * pitch * lanes;
            let samples = padded.chunks_exact(planes * plane_len);
            for (sample, image) in row.chunks_exact_mut(rows * wo * lanes).zip(samples) {
                let plane = &image[plane * plane_len..][..plane_len];
                copy_rows(sample, &plane[start..], wo * lanes, sh * pitch * lanes);
            }
        }

        /// Adds each tap's row of `columns` (`[taps, positions]` of one sample) back into
        /// `padded` (one sample, padded and phase-split) where [`Self::fill_tap_row`] copies
        /// it from: the adjoint of im2col.
        fn add_tap_rows(
            &self,
            columns: &[f32],
            [row_length, first]: [usize; 2],
            padded: &mut [f32],
        ) {
            let (kh, kw, wo) = (self.kh, self.kw, self.wo);
            let [sh, sw] = self.stride;
            let [hp, pitch, phase] = self.padded_plane();
            let rows = columns.chunks_exact(row_length);
            for (tap, row) in rows
                .map(|row| &row[first..][..self.positions()])
                .enumerate()
            {
                let (c, i, j) = (tap / (kh * kw), tap / kw % kh, tap % kw);
                let plane = &mut padded[c * hp * pitch..][..hp * pitch];
                let start = i * pitch + j % sw * phase + j / sw;
                for (oy, values) in row.chunks_exact(wo).enumerate() {
                    let out = &mut plane[start + oy * sh * pitch..][..wo];
                    for (o, v) in out.iter_mut().zip(values) {
                        *o += v;
                    }
                }
            }
        }

        /// Samples `first..first + count` padded and phase-split as [`Self::padded`] lays them
        /// out, in bf16 with their channels interleaved in pairs, `[count, ceil(C_in / 2), rows,
        /// pitch, 2]` (the second of an odd last pair zero), each value through `norm` when
        /// given: the two taps of a channel pair at one kernel offset are then one run of
        /// value pairs, the layout of a row of an AMX B tile. Each pair's two padded planes go
        /// through `planes` (f32 scratch, in L1) on the way, not the whole samples through
        /// memory.
        fn padded_pairs<'a>(
            &self,
            xs: &[f32],
            [first, count]: [usize; 2],
            norm: Option<&ChannelNorm>,
            buffer: &'a mut Vec<u16>,
            planes: &mut Vec<f32>,
        ) -> &'a [u16] {
            let [hp, pitch, _] = self.padded_plane();
            let (plane, pairs) = (hp * pitch, self.cin.div_ceil(2));
            let (channel, image) = (self.h * self.w, self.cin * self.h * self.w);
            let as_is = norm.is_none() && self.pad == [0, 0] && self.stride[1] == 1;
            let phase_runs = self.column_phases();
            let out = prefix(buffer, count * pairs * plane * 2);
            let (first_plane, second_plane) = prefix(planes, 2 * plane).split_at_mut(plane);
            let samples = xs[first * image..][..count * image].chunks_exact(image);
            for (out, sample) in out.chunks_exact_mut(pairs * plane * 2).zip(samples) {
                let values = |c: usize| &sample[c * channel..][..channel];
                let pad = |c: usize, scratch: &mut [f32]| {
                    let norm = norm.map(|norm| norm.channel(c));
                    self.pad_plane(values(c), norm, &phase_runs, scratch);
                };
                for (p, out) in out.chunks_exact_mut(plane * 2).enumerate() {
                    let (a, b) = (2 * p, 2 * p + 1);
                    let first: &[f32] = if as_is {
                        values(a)
                    } else {
                        pad(a, first_plane);
                        first_plane
                    };
                    let second: &[f32] = if b == self.cin {
                        &[]
                    } else if as_is {
                        values(b)
                    } else {
                        pad(b, second_plane);
                        second_plane
                    };
                    amx::interleave_runs(first, second, out);
                }
            }
            out
        }
    }

    /// The weights `[C_out, C_in, kh, kw]` packed for AMX with their taps in the channel-pair
    /// order of [`Geometry::padded_pairs`]: depth `2 * ((c / 2) * kh * kw + offset) + c % 2`
    /// holds channel `c` at kernel offset `offset` (zero for the missing channel of an odd
    /// `C_in`).
    fn pack_pair_weights<'a>(
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
    fn pack_weights<'a>(
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

    /// `out[k] = f(values[step * k])` for every `k` of `out`: at a step of 2 by
    /// [`every_second`].
    #[inline(always)]
    fn every_nth<T>(out: &mut [T], values: &[f32], step: usize, f: impl Fn(f32) -> T) {
        if step == 2 {
            return every_second(out, values, f);
        }
        for (o, &v) in out.iter_mut().zip(values.iter().step_by(step)) {
            *o = f(v);
        }
    }

    /// `out[k] = f(inputs[2 k])` for every `k` of `out`: whole pairs first, which the compiler
    /// de-interleaves with vector shuffles (by index it loaded and stored value by value), then
    /// the last value.
    #[inline(always)]
    fn every_second<T>(out: &mut [T], inputs: &[f32], f: impl Fn(f32) -> T) {
        let Some((last, out)) = out.split_last_mut() else {
            return;
        };
        let pairs = &inputs.as_chunks::<2>().0[..out.len()];
        for (o, &[v, _]) in out.iter_mut().zip(pairs) {
            *o = f(v);
        }
        *last = f(inputs[2 * out.len()]);
    }

    /// Copies `src[r * step..][..width]` to `dst[r * width..][..width]` for every row `r` of
    /// `dst`. The short rows of im2col (4 to 32 values in a CIFAR ResNet) get copies of a
    /// fixed size, which compile to vector moves instead of calls to `memcpy`.
    #[inline(always)]
    fn copy_rows<T: Copy>(dst: &mut [T], src: &[T], width: usize, step: usize) {
        fn fixed<T: Copy, const W: usize>(dst: &mut [T], src: &[T], step: usize) {
            for (r, out) in dst.chunks_exact_mut(W).enumerate() {
                let out: &mut [T; W] = out.try_into().expect("chunks of W");
                *out = src[r * step..][..W].try_into().expect("a run of W");
            }
        }
        match width {
            4 => fixed::<T, 4>(dst, src, step),
            8 => fixed::<T, 8>(dst, src, step),
            16 => fixed::<T, 16>(dst, src, step),
            32 => fixed::<T, 32>(dst, src, step),
            64 => fixed::<T, 64>(dst, src, step),
            _ => {
                for (r, out) in dst.chunks_exact_mut(width).enumerate() {
                    out.copy_from_slice(&src[r * step..][..width]);
                }
            }
        }
    }

    /// NCHW samples (`planes`, `[C, H, W]` each) as `[count, hp, wp, C]` in `buffer`, each
    /// image `[ph, pw]` from the top left and zeros around it, each value through `norm` when
    /// given: blocks of 16 channels x 16 pixels, each loaded from the channels' planes,
    /// normalised, transposed and stored as 16 pixels' runs of channels.
    #[inline(always)]
    fn channels_last<'a>(
        planes: &[f32],
        [c, h, w]: [usize; 3],
        [ph, pw]: [usize; 2],
        [hp, wp]: [usize; 2],
        buffer: &'a mut Vec<f32>,
        norm: Option<&ChannelNorm>,
    ) -> &'a [f32] {
        const LANES: usize = winograd::LANES;
        assert!(hp >= ph + h && wp >= pw + w, "padded extent too small");
        let count = planes.len() / (c * h * w);
        let out = prefix(buffer, count * hp * wp * c);
        for (sample, image) in out
            .chunks_exact_mut(hp * wp * c)
            .zip(planes.chunks_exact(c * h * w))
        {
            sample[..ph * wp * c].fill(0.0);
            sample[(ph + h) * wp * c..].fill(0.0);
            for row in sample[ph * wp * c..(ph + h) * wp * c].chunks_exact_mut(wp * c) {
                row[..pw * c].fill(0.0);
                row[(pw + w) * c..].fill(0.0);
            }
            for c0 in (0..c).step_by(LANES) {
                let nc = LANES.min(c - c0);
                let channels: Option<[_; LANES]> =
                    norm.map(|norm| std::array::from_fn(|k| norm.channel((c0 + k).min(c - 1))));
                for p0 in (0..h * w).step_by(LANES) {
                    let np = LANES.min(h * w - p0);
                    let mut block = [[0.0f32; LANES]; LANES];
                    for (k, row) in block.iter_mut().take(nc).enumerate() {
                        *row = winograd::load(&image[(c0 + k) * h * w + p0..], np);
                        if let Some(channels) = &channels {
                            for v in row.iter_mut() {
                                *v = channels[k](*v, 0.0);
                            }
                        }
                    }
                    transpose16(&mut block);
                    // Pixel by pixel without a division each (16 of them cost as much as the
                    // block's transpose).
                    let (mut y, mut x) = (p0 / w, p0 % w);
                    for row in block.iter().take(np) {
                        winograd::store(&mut sample[((ph + y) * wp + pw + x) * c + c0..], row, nc);
                        x += 1;
                        if x == w {
                            (y, x) = (y + 1, 0);
                        }
                    }
                }
            }
        }
        out
    }

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

    /// [`weight_grad`] with the sum split over the threads: each sums its samples into a
    /// `[taps, C_out]` part of its own, a chunk of samples at a time, their im2col made in its
    /// own buffers and read while in cache: in bf16 on AMX tiles ([`add_chunk_on_amx`], where
    /// the flat weight gradient does not apply), in f32 for the small results (at most
    /// [`SPLIT_SUM_MAX_RESULT`], where gemm's own threading splits `m x n` only) by gemm on
    /// the thread ([`add_chunk_by_gemm`]).
    fn split_weight_grad(
        g: &Geometry,
        xs: &[f32],
        dys: &[f32],
        norm: Option<&ChannelNorm>,
        bf16: bool,
    ) -> Vec<f32> {
        let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
        let chunk = if bf16 {
            AMX_GRADIENT_B_BYTES / (positions * cout * 2)
        } else {
            SPLIT_CHUNK_FLOATS / (positions * taps)
        };
        summed_by_threads(g, chunk, |part, [first, count], accumulate| {
            // Out of `part` while the chunk is read from it, which leaves `part` free to lend.
            let mut padded = std::mem::take(&mut part.padded);
            let inputs = g.padded(xs, [first, count], &mut padded, false, norm);
            let dys = &dys[first * cout * positions..][..count * cout * positions];
            if bf16 {
                add_chunk_on_amx(g, [inputs, dys], count, part, accumulate);
            } else {
                add_chunk_by_gemm(g, [inputs, dys], count, part);
            }
            part.padded = padded;
        })
    }

    /// A `[C_out, taps]` weight gradient summed over the threads: each adds its own samples,
    /// `chunk` at a time, into a `[taps, C_out]` part of its own that keeps its buffers
    /// across the chunks (`add(part, [first, count], accumulate)`, `accumulate` false on its
    /// first chunk, when the part is still zero); the parts are then added and transposed.
    fn summed_by_threads(
        g: &Geometry,
        chunk: usize,
        add: impl Fn(&mut SumPart, [usize; 2], bool) + Sync,
    ) -> Vec<f32> {
        let (taps, cout, chunk) = (g.taps(), g.cout, chunk.clamp(1, g.n));
        let threads = rayon::current_num_threads().clamp(1, g.n);
        let mut parts: Vec<SumPart> = (0..threads).map(|_| SumPart::new(taps * cout)).collect();
        parts.par_iter_mut().enumerate().for_each(|(index, part)| {
            let samples = g.n * index / threads..g.n * (index + 1) / threads;
            for first in samples.clone().step_by(chunk) {
                let count = chunk.min(samples.end - first);
                add(part, [first, count], first > samples.start);
            }
        });
        transposed_sum(&parts, [taps, cout])
    }

    /// `part.sum += im2col [taps, S * P] x dy^T [S * P, C_out]` of a chunk of `count` samples
    /// (`padded` as [`Geometry::padded`] makes them, `dys` NCHW) by gemm on this thread: the
    /// chunk's im2col (at most [`SPLIT_CHUNK_FLOATS`]) in `part`'s buffer, `dy` read where it
    /// lies for a chunk of one sample.
    fn add_chunk_by_gemm(
        g: &Geometry,
        [padded, dys]: [&[f32]; 2],
        count: usize,
        part: &mut SumPart,
    ) {
        let (positions, taps, cout) = (g.positions(), g.taps(), g.cout);
        let depth = count * positions;
        let columns = prefix(&mut part.im2col, taps * depth);
        for (tap, row) in columns.chunks_exact_mut(depth).enumerate() {
            g.fill_tap_row(padded, tap, [0, g.ho], row);
        }
        let grads = side_by_side(dys, [cout, positions], &mut part.grads);
        gemm_into(
            &mut part.sum,
            [1, cout],
            [cout, taps, depth],
            grads,
            [depth, 1],
            columns,
            [1, depth],
            true,
            gemm::Parallelism::None,
        );
    }

    /// [`add_chunk_by_gemm`] on AMX tiles, adding to `part.sum` when `accumulate` (else
    /// overwriting it): `dy^T` packed as B once (at most [`AMX_GRADIENT_B_BYTES`]), which
    /// every block of taps then reuses from L2, and the im2col rows of a block of taps at a
    /// time packed as A straight from the padded input (at most [`AMX_GRADIENT_A_BYTES`]), so
    /// that each block of the sum is loaded and stored once per chunk.
    fn add_chunk_on_amx(
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

    /// Whether [`weight_grad`] in bf16 takes [`flat_weight_grad`]: stride 1, channels in
    /// blocks of 32, rows (padded, and of the output) of even length, so that the flat
    /// positions pair up within a row, and at least `FLAT_MIN_WIDTH` wide.
    fn takes_flat_gradient(g: &Geometry) -> bool {
        let width = g.w + 2 * g.pad[1];
        g.stride == [1, 1]
            && amx::weight_gradient_applies(g.cin, g.cout)
            && width.is_multiple_of(2)
            && g.wo.is_multiple_of(2)
            && g.wo >= FLAT_MIN_WIDTH
    }

    /// [`weight_grad`] in bf16 by [`amx::add_weight_gradient`], with no im2col: each thread
    /// lays its samples out flat, a chunk at a time (the input as padded bf16 planes, through
    /// `norm` as it is copied; `dy` over the same positions, transposed to pairs of positions
    /// by 16 x 16 blocks), and sums them into its own `[taps, C_out]` part.
    fn flat_weight_grad(
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

    /// One thread's share of a weight gradient split over the threads: its `[taps, C_out]`
    /// sum over every chunk, and (bf16) its packing buffers, kept across the chunks.
    struct SumPart {
        sum: Vec<f32>,
        row: Vec<f32>,
        padded: Vec<f32>,
        /// f32: the chunk's im2col and (for several samples) its `dy` (in the direct weight
        /// gradient: its lanes, and each sample's line-aligned `dy`).
        im2col: Vec<f32>,
        grads: Vec<f32>,
        /// bf16: packed operands.
        columns: Vec<u16>,
        dy: Vec<u16>,
    }

    impl SumPart {
        fn new(len: usize) -> Self {
            SumPart {
                sum: vec![0.0; len],
                row: Vec::new(),
                padded: Vec::new(),
                im2col: Vec::new(),
                grads: Vec::new(),
                columns: Vec::new(),
                dy: Vec::new(),
            }
        }
    }

    /// The `[C_out, taps]` weight gradient: the parts' `[taps, C_out]` sums added and
    /// transposed in one pass, output channels in parallel, by 16 x 16 blocks (rows of the
    /// sums read and rows of the result written as runs of 16).
    fn transposed_sum(parts: &[SumPart], [taps, cout]: [usize; 2]) -> Vec<f32> {
        /// Output channels per task.
        const CHANNELS: usize = 16;
        // SAFETY: each run's channels get every tap, 16 taps at a time.
        unsafe {
            written_by_runs(cout * taps, CHANNELS * taps, |block, out| {
                let (first, channels) = (block * CHANNELS, out.len() / taps);
                wide(
                    #[inline(always)]
                    || {
                        for first_tap in (0..taps).step_by(CHANNELS) {
                            let count = CHANNELS.min(taps - first_tap);
                            let mut sums = [[0f32; CHANNELS]; CHANNELS];
                            for (tap, sums) in sums.iter_mut().enumerate().take(count) {
                                for part in parts {
                                    let at = (first_tap + tap) * cout + first;
                                    let row = &part.sum[at..at + channels];
                                    for (s, &v) in sums.iter_mut().zip(row) {
                                        *s += v;
                                    }
                                }
                            }
                            transpose16(&mut sums);
                            for (out, sums) in out.chunks_exact_mut(taps).zip(&sums) {
                                out[first_tap..first_tap + count]
                                    .copy_from_slice(as_slots(&sums[..count]));
                            }
                        }
                    },
                )
            })
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
                    amx::OwnedA::packed(|buffer| {
                        amx::pack_a_rows(buffer, [taps, cout], transposed_row)
                    })
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
                direct::pack_pointwise_weights(&weights, [cout, g.cin])
            });
            let values = pointwise_convolve(&g, &xs, &packed, norm, &sums);
            return sums.kept_for(tensor(values, output_shape));
        }
        if takes_direct(&g, bf16) {
            let packed = step_cache::derived(&weight, "direct weights", || {
                direct::pack_weights(&weights, [cout, g.cin])
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
                            if let (Some(weights), Some(tile)) = (&packed_weights, &packed_columns)
                            {
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

    /// Whether [`convolve`] in bf16 takes [`pair_planes_convolve`]: sizes as
    /// [`amx::pair_planes_apply`] allows, the same stride both ways (stride 2: the 64 -> 128
    /// 3x3 of a width-1 ResNet-18, its rows of 16; per convolution 10.9-11.7 ms by im2col).
    fn takes_pair_planes(g: &Geometry) -> bool {
        g.stride[0] == g.stride[1] && amx::pair_planes_apply(g.cin, g.cout, [g.ho, g.wo])
    }

    /// [`convolve`] in bf16 by [`amx::convolve_pair_planes`], sample by sample: the input
    /// copied into padded planes of channel pairs in bf16 (through `norm` as it is copied;
    /// split into the `stride x stride` phases of the padded positions when strided) and
    /// convolved where it lies, with no im2col; the products land in the NCHW output as they
    /// are.
    fn pair_planes_convolve(
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

    /// The weights `[C_out, C_in, kh, kw]` packed for AMX as `[C_out, taps * C_in]`, the depth
    /// tap-major (`(i * kw + j) * C_in + c`): the A of [`pair_planes_convolve`].
    fn pack_tap_major_weights<'a>(
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

    /// Whether a convolution reads only every `stride`-th row and column of its input (a 1x1
    /// kernel, no padding, a stride, as a ResNet's downsample): it is then the stride-1
    /// convolution of that subsample ([`subsampled`]), its weight gradient that one's, and its
    /// input gradient that one's spread back ([`spread`]). Timed alone at width 1 (f32, ms):
    /// 64 -> 128 channels at 32x32 forward 3.47, weight gradient 7.36, input gradient 5.05
    /// through the strided im2col and col2im.
    fn reads_a_subsample(g: &Geometry) -> bool {
        [g.kh, g.kw] == [1, 1] && g.pad == [0, 0] && g.stride != [1, 1]
    }

    /// Stride 1, no padding: the options of a subsample's convolution.
    fn unstrided() -> ConvOptions<2> {
        ConvOptions::new([1, 1], [0, 0], [1, 1], 1)
    }

    /// The values a [`reads_a_subsample`] convolution reads, `[N, C_in, H_out, W_out]`.
    fn subsampled(xs: &[f32], g: &Geometry) -> FloatTensor<Flex> {
        let [sh, sw] = g.stride;
        let (plane, sub) = (g.h * g.w, g.ho * g.wo);
        // SAFETY: each run (one plane of the subsample) writes every one of its slots.
        let values = unsafe {
            written_by_runs(g.n * g.cin * sub, sub, |p, slots| {
                let image = &xs[p * plane..][..plane];
                for (y, row) in slots.chunks_exact_mut(g.wo).enumerate() {
                    every_nth(row, &image[y * sh * g.w..], sw, std::mem::MaybeUninit::new);
                }
            })
        };
        tensor(values, Shape::new([g.n, g.cin, g.ho, g.wo]))
    }

    /// The input gradient of a [`reads_a_subsample`] convolution from its subsample's
    /// (`sub`): each value back where [`subsampled`] took it from, zeros elsewhere.
    fn spread(sub: &[f32], g: &Geometry) -> FloatTensor<Flex> {
        let [sh, sw] = g.stride;
        let (plane, part) = (g.h * g.w, g.ho * g.wo);
        let values = filled_by_runs(g.n * g.cin * plane, plane, |p, image| {
            let sub = &sub[p * part..][..part];
            for (y, row) in sub.chunks_exact(g.wo).enumerate() {
                let out = &mut image[y * sh * g.w..];
                for (x, &v) in row.iter().enumerate() {
                    out[x * sw] = v;
                }
            }
        });
        tensor(values, Shape::new([g.n, g.cin, g.h, g.w]))
    }

    /// Whether [`convolve`] takes [`pointwise_convolve`]: an f32 1x1 convolution at stride 1
    /// (a strided one reads its subsample) with no padding that [`direct::pointwise_applies`]
    /// to, of at most [`POINTWISE_MAX_WORK`] multiply-adds per sample.
    fn takes_pointwise(g: &Geometry, bf16: bool) -> bool {
        [g.kh, g.kw] == [1, 1]
            && g.stride == [1, 1]
            && g.pad == [0, 0]
            && direct::pointwise_applies(g.cout, g.positions())
            && g.cin * g.cout * g.positions() <= POINTWISE_MAX_WORK
            && !bf16
    }

    /// [`convolve`] by [`direct::pointwise_sample`], sample by sample in parallel (each
    /// through `norm` into this thread's scratch first, when given), its output sums taken
    /// while it is in cache.
    fn pointwise_convolve(
        g: &Geometry,
        xs: &[f32],
        packed: &[f32],
        norm: Option<&ChannelNorm>,
        sums: &OutputSums,
    ) -> Vec<f32> {
        let image = g.cin * g.positions();
        let shape = [g.cin, g.cout, g.positions()];
        // SAFETY: `pointwise_sample` writes every value of the sample's output.
        unsafe {
            written_by_samples(g, sums, |s, out| {
                let x = &xs[s * image..][..image];
                match norm {
                    None => direct::pointwise_sample(x, packed, shape, out),
                    Some(norm) => with_scratch(|scratch| {
                        let normalised = prefix(&mut scratch.padded, image);
                        direct::normalise_sample(x, [g.cin, g.positions()], norm, normalised);
                        direct::pointwise_sample(normalised, packed, shape, out);
                    }),
                }
            })
        }
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

    /// Whether [`convolve`] takes [`direct_convolve`]: a 3x3, padding-1 convolution of stride 1
    /// or 2 that [`direct::applies`] to, with at most [`DIRECT_MAX_CHANNELS`] channels on one
    /// side (a stem's three inputs) and, in bf16, as narrow as [`takes_winograd`] allows.
    fn takes_direct(g: &Geometry, bf16: bool) -> bool {
        [g.kh, g.kw] == [3, 3]
            && (g.stride == [1, 1] || g.stride == [2, 2])
            && g.pad == [1, 1]
            && direct::applies(g.cout, g.wo)
            && g.cin.min(g.cout) <= DIRECT_MAX_CHANNELS
            && (!bf16 || g.cin.max(g.cout) <= BF16_WINOGRAD_MAX_CHANNELS)
    }

    /// [`convolve`] by [`direct::forward_sample`], sample by sample in parallel: each padded
    /// (through `norm`) into this thread's scratch, convolved, and its output sums taken
    /// while it is in cache.
    fn direct_convolve(
        g: &Geometry,
        xs: &[f32],
        packed: &[f32],
        norm: Option<&ChannelNorm>,
        sums: &OutputSums,
    ) -> Vec<f32> {
        // SAFETY: `forward_sample` writes every value of the sample's output.
        unsafe {
            written_by_samples(g, sums, |s, out| {
                with_scratch(|scratch| {
                    let (padded, layout) = direct_padded(g, xs, s, norm, &mut scratch.padded);
                    let shape = [g.cin, g.cout, g.ho, g.wo];
                    direct::forward_sample(padded, layout, packed, shape, out);
                })
            })
        }
    }

    /// [`weight_grad`] by [`direct::add_gradient_sample`]: each thread adds its share of the
    /// samples (in one call: each sample padded through `norm` into the thread's scratch, its
    /// output gradient copied to a cache line's start) into sums of its own, lane by lane,
    /// which it adds up once at the end.
    fn direct_weight_grad(
        g: &Geometry,
        xs: &[f32],
        dys: &[f32],
        norm: Option<&ChannelNorm>,
    ) -> Vec<f32> {
        let (cout, sample) = (g.cout, g.cout * g.positions());
        let shape = [g.cin, cout, g.ho, g.wo];
        summed_by_threads(g, g.n, |part, [first, count], accumulate| {
            let lanes = prefix(&mut part.im2col, g.taps() * cout * direct::LANES);
            lanes.fill(0.0);
            for s in first..first + count {
                let (padded, layout) = direct_padded(g, xs, s, norm, &mut part.padded);
                let dy = direct::line_aligned(&dys[s * sample..][..sample], &mut part.grads);
                direct::add_gradient_sample(padded, layout, dy, shape, lanes);
            }
            direct::gradient_lanes_sum(lanes, &mut part.sum, accumulate);
        })
    }

    /// Sample `s` padded (through `norm`) for the direct kernels, in `buffer`, and how it lies:
    /// at stride 1 by [`direct::pad_sample`], strided split into phases by
    /// [`Geometry::padded`].
    fn direct_padded<'a>(
        g: &Geometry,
        xs: &'a [f32],
        s: usize,
        norm: Option<&ChannelNorm>,
        buffer: &'a mut Vec<f32>,
    ) -> (&'a [f32], direct::Padding) {
        let [rows, pitch, phase] = g.padded_plane();
        let layout = direct::Padding {
            stride: g.stride[1],
            rows,
            pitch,
            phase,
        };
        if g.stride == [1, 1] {
            let image = g.cin * g.h * g.w;
            let padded = prefix(buffer, g.cin * rows * pitch);
            direct::pad_sample(&xs[s * image..][..image], [g.cin, g.h, g.w], norm, padded);
            return (padded, layout);
        }
        (g.padded(xs, [s, 1], buffer, false, norm), layout)
    }

    /// Whether [`convolve`] takes [`winograd_convolve`]. Its transforms and copies cost per
    /// value, what it saves grows with the channels: measured, every 3x3 layer of a ResNet-18
    /// gains at width 1 (channels x output width 2,048) and, since F(4x4, 3x3), at width 0.25
    /// (512: the step 1.07x; 0.99x with F(2x2, 3x3)). In bf16 only the narrowest layers
    /// (`BF16_WINOGRAD_MAX_CHANNELS`): f32 Winograd there beats the AMX tiles.
    fn takes_winograd(g: &Geometry, bf16: bool) -> bool {
        winograd::applies([g.kh, g.kw], g.stride, g.pad)
            && g.cin.min(g.cout) * g.wo >= WINOGRAD_MIN_WORK
            && (!bf16 || g.cin.max(g.cout) <= BF16_WINOGRAD_MAX_CHANNELS)
    }

    /// Whether [`weight_grad`] takes [`winograd_weight_grad`]: where an f32 forward takes
    /// Winograd and the output is even; in bf16, up to `BF16_WINOGRAD_GRADIENT_MAX_CHANNELS`.
    fn takes_winograd_gradient(g: &Geometry, bf16: bool) -> bool {
        takes_winograd(g, false)
            && winograd::gradient_applies([g.kh, g.kw], g.stride, g.pad, [g.ho, g.wo])
            && (!bf16 || g.cin.max(g.cout) <= BF16_WINOGRAD_GRADIENT_MAX_CHANNELS)
    }

    /// [`convolve`] of a 3x3, stride-1, padding-1 convolution by Winograd's F(4x4, 3x3)
    /// ([`winograd`]): per block of samples (or of tile rows, for large images), the padded
    /// input copied channels-last and transformed, 36 single-threaded GEMMs
    /// `[C_out, C_in] x [C_in, tiles]` (gemm's, or [`winograd::point_products`]), and their
    /// products transformed into the output, whose [`OutputSums`] each block takes then.
    fn winograd_convolve(
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

    /// [`weight_grad`] of a 3x3, stride-1, padding-1 convolution by Winograd's F(3x3, 2x2)
    /// ([`winograd::gradient_output_grad`]): per block of samples (or of tile rows), the padded
    /// input and the output gradient channels-last and transformed, and 16 GEMMs
    /// `[C_out, tiles] x [tiles, C_in]` adding into the sums of the 16 points, then transformed
    /// into the kernels' gradient. The threads split the blocks, each into sums of its own
    /// added at the end; where those would be large (16 x C_in x C_out: 16 MB each at 512
    /// channels, +66 MiB peak memory), they split the points by rows of the 4x4 tile instead
    /// (both transforms cost in proportion) into one sum, each transposing every block's input
    /// and gradient (measured 0.93x the step with the blocks split, over all layers).
    fn winograd_weight_grad(
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
}

pub(super) mod autodiff {
    use super::{GemmConvOps, on_gemm};
    use burn::backend::ops::ConvOptions;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{AutodiffBackend, Backend, TensorMetadata};
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn_autodiff::grads::Gradients;
    use burn_autodiff::ops::{Backward, Ops, OpsKind};

    #[derive(Debug)]
    struct GemmConv2d;

    impl<B: Backend + GemmConvOps> Backward<B, 2> for GemmConv2d {
        /// Input, weight, options, bf16.
        type State = (FloatTensor<B>, FloatTensor<B>, ConvOptions<2>, bool);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_weight] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let (x, weight, options, bf16) = ops.state;
            if let Some(node) = node_weight {
                let weight_grad =
                    weight_gradient::<B>(x.clone(), &weight, grad.clone(), &options, bf16);
                grads.register::<B>(node.id, weight_grad);
            }
            if let Some(node) = node_x {
                let x_grad = input_gradient::<B>(x, weight, grad, options, bf16);
                grads.register::<B>(node.id, x_grad);
            }
        }
    }

    /// The weight gradient of a convolution of `x` with `weight` given its output's gradient:
    /// on our GEMM where [`on_gemm`] allows, burn's otherwise.
    pub(in crate::model::fused) fn weight_gradient<B: Backend + GemmConvOps>(
        x: FloatTensor<B>,
        weight: &FloatTensor<B>,
        grad: FloatTensor<B>,
        options: &ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<B> {
        if on_gemm(options) {
            let shape = weight.shape();
            B::gemm_conv2d_weight_grad(x, grad, [shape[2], shape[3]], options.clone(), bf16)
        } else {
            B::conv2d_weight_backward(x, weight.clone(), grad, options.clone())
        }
    }

    /// The input gradient of the same: ours where [`on_gemm`] allows (a stride-1 convolution
    /// where it is one, col2im otherwise), burn's otherwise. `x` is read for its shape only.
    pub(in crate::model::fused) fn input_gradient<B: Backend + GemmConvOps>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        grad: FloatTensor<B>,
        options: ConvOptions<2>,
        bf16: bool,
    ) -> FloatTensor<B> {
        if on_gemm(&options) {
            let input = x.shape().dims::<4>();
            B::gemm_conv2d_input_grad(grad, weight, input, options, bf16)
        } else {
            B::conv2d_x_backward(x, weight, grad, options)
        }
    }

    impl<B: Backend + GemmConvOps, C: CheckpointStrategy> GemmConvOps for Autodiff<B, C> {
        fn gemm_conv2d(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            options: ConvOptions<2>,
            bf16: bool,
        ) -> FloatTensor<Self> {
            let nodes = [x.node(), weight.node()];
            let (x, weight) = (x.into_primitive(), weight.into_primitive());
            let output = B::gemm_conv2d(x.clone(), weight.clone(), options.clone(), bf16);
            match GemmConv2d.prepare::<C>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((x, weight, options, bf16), output),
                OpsKind::UnTracked(prep) => prep.finish(output),
            }
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
        fn gemm_conv2d_weight_grad(
            x: FloatTensor<Self>,
            output_grad: FloatTensor<Self>,
            kernel: [usize; 2],
            options: ConvOptions<2>,
            bf16: bool,
        ) -> FloatTensor<Self> {
            Self::from_inner(B::gemm_conv2d_weight_grad(
                Self::inner(x),
                Self::inner(output_grad),
                kernel,
                options,
                bf16,
            ))
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
        fn gemm_conv2d_input_grad(
            output_grad: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            input: [usize; 4],
            options: ConvOptions<2>,
            bf16: bool,
        ) -> FloatTensor<Self> {
            Self::from_inner(B::gemm_conv2d_input_grad(
                Self::inner(output_grad),
                Self::inner(weight),
                input,
                options,
                bf16,
            ))
        }
    }
}

/// A bias-free square convolution with symmetric padding, as the tests here and in
/// [`super::norm_conv`] build them.
#[cfg(test)]
pub(super) fn test_conv(
    [cin, cout]: [usize; 2],
    kernel: usize,
    stride: usize,
    pad: usize,
    device: &burn::tensor::Device,
) -> Conv2d {
    burn::nn::conv::Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(burn::nn::PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .init(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::tensor::{Device, Distribution};

    /// Under a step's caches, a convolution keeps the per-sample sums of its output for the
    /// norm that reads it (the bf16 pair-plane and im2col paths, and the f32 im2col, direct and
    /// Winograd ones), and they are the sums of the output it returns; the norm takes them once.
    /// Without the caches, or for an input gradient, nothing is kept.
    #[test]
    fn a_convolution_keeps_its_output_sums_for_the_next_norm() {
        use super::super::batch_norm::flex::sample_sums;
        use super::super::step_cache::{StepCacheScope, take_sums};
        use burn::tensor::Shape;
        use flex::Output;
        let values = |len: usize| super::super::test_values(len, 3);
        let amx = super::super::amx::available();
        // (C_in, C_out, image size, stride, bf16); outputs of one position go several samples
        // to a GEMM.
        for (cin, cout, size, stride, bf16) in [
            (32, 64, 16, 1, true),
            (32, 64, 8, 1, true),
            (32, 64, 2, 2, true),
            (6, 10, 9, 2, false),
            (6, 10, 2, 2, false),
            // The direct kernels (on AVX-512; elsewhere Winograd).
            (8, 16, 16, 1, false),
            // Winograd, point-major and (on AVX-512) tile-major, in blocks of tile rows.
            (6, 10, 9, 1, false),
            (16, 16, 9, 1, false),
        ] {
            if bf16 && !amx {
                continue;
            }
            // More samples than a GEMM takes (7 in the tests).
            let n = 9;
            let x = super::super::tensor(
                values(n * cin * size * size),
                Shape::new([n, cin, size, size]),
            );
            let weight =
                super::super::tensor(values(cout * cin * 9), Shape::new([cout, cin, 3, 3]));
            let options = ConvOptions::new([stride; 2], [1, 1], [1, 1], 1);
            let convolve = |output| {
                flex::convolve(
                    x.clone(),
                    weight.clone(),
                    options.clone(),
                    bf16,
                    None,
                    output,
                )
            };
            assert!(
                take_sums(&convolve(Output::Normalised)).is_none(),
                "kept without a scope"
            );
            let _scope = StepCacheScope::start();
            let gradient = convolve(Output::Gradient);
            assert!(take_sums(&gradient).is_none(), "kept for a gradient");
            let output = convolve(Output::Normalised);
            let sums = take_sums(&output).expect("sums kept under a scope");
            assert!(take_sums(&output).is_none(), "taken twice");
            let shape = output.layout().shape().clone();
            let positions = shape[2] * shape[3];
            let out = super::super::contiguous_f32(&output);
            let mut expected = vec![[0f32; 3]; n * cout];
            for (sums, sample) in expected
                .chunks_exact_mut(cout)
                .zip(out.chunks_exact(cout * positions))
            {
                sample_sums(sample, positions, sums);
            }
            assert_eq!(sums, expected, "{cin} -> {cout} at {size}, bf16 {bf16}");
        }
    }

    /// Output and gradients (input and weight) against burn's own `Conv2d`, for the stride-1
    /// case that takes the convolution path and a strided one that keeps burn's backward.
    #[test]
    fn matches_burns_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(5);
        // 9x9 images span several tiles of output rows, 3x3 ones (and 5x5 with stride 2) end
        // in a partial tile (at stride 1, partial Winograd tiles too, and an im2col weight
        // gradient); 2x2 ones with stride 2 (one output position each) go several to a tile.
        for (kernel, stride, pad, size, [cin, cout]) in [
            (3, 1, 1, 9, [4, 6]),
            (1, 1, 0, 9, [4, 6]),
            (3, 2, 1, 9, [4, 6]),
            (1, 2, 0, 9, [4, 6]),
            (7, 2, 3, 9, [4, 6]),
            (3, 2, 1, 2, [4, 6]),
            (3, 1, 1, 3, [4, 6]),
            (3, 2, 1, 5, [4, 6]),
            // Output rows of 8 and 4: the fixed-size row copies (and Winograd at stride 1,
            // over several tile rows; at 2x2, one tile per sample, several samples per GEMM).
            (3, 1, 1, 8, [4, 6]),
            (3, 1, 1, 2, [4, 6]),
            (3, 2, 1, 8, [4, 6]),
            // 20 output channels: a Winograd weight gradient large enough that the threads
            // split its points rather than its samples.
            (3, 1, 1, 8, [4, 20]),
            // 16 to 64 channels: on AVX-512, 16 and 32 take the narrow kernels (the Winograd
            // transforms in registers and `winograd::point_products` in the forward and,
            // channels swapped, the input gradient; `winograd::gradient_products` in the
            // weight gradient), 32 to 64 gemm's.
            (3, 1, 1, 8, [16, 16]),
            (3, 1, 1, 8, [16, 32]),
            (3, 1, 1, 4, [32, 64]),
            // On AVX-512, rows of 16 and 32 with up to 16 channels on one side take the direct
            // kernels: one vector a row (blocks of 6, 3 and 1 rows; the input gradient too, channels
            // swapped) and two (blocks of 3 and 1; the stem's 3 input channels, whose input
            // gradient of 3 channels takes Winograd).
            (3, 1, 1, 16, [8, 16]),
            (3, 1, 1, 32, [3, 8]),
            // At stride 2 too, the forward and weight gradient, from the phase-split padding
            // (the input gradient by col2im).
            (3, 2, 1, 32, [8, 16]),
            // On AVX-512, 1x1 convolutions of whole vectors of positions take the pointwise
            // kernel (the input gradient too, channels swapped): planes of one vector (groups of
            // four blocks of 4 output channels at 16, of one block at 8), of four (runs of 3
            // and 1) and of nine (runs of 6 and 3), at stride 1 and of a stride-2 subsample.
            (1, 1, 0, 4, [8, 16]),
            (1, 2, 0, 8, [16, 8]),
            (1, 1, 0, 8, [16, 8]),
            (1, 1, 0, 12, [4, 12]),
            (1, 2, 0, 8, [6, 16]),
        ] {
            let conv = test_conv([cin, cout], kernel, stride, pad, &device);
            let x = Tensor::<4>::random(
                [3, cin, size, size],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            assert!(gemm_path(&conv, &x).is_some());
            let run = |ours: bool| {
                let x = x.clone().detach().require_grad();
                let y = if ours {
                    forward(&conv, x.clone())
                } else {
                    conv.forward(x.clone())
                };
                let weights =
                    Tensor::<4>::ones(y.dims(), &device).mul_scalar(0.5) + y.clone().detach();
                let grads = (y.clone() * weights).sum().backward();
                let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
                (
                    flat(y),
                    flat(x.grad(&grads).unwrap()),
                    flat(conv.weight.grad(&grads).unwrap()),
                )
            };
            let (ours, theirs) = (run(true), run(false));
            // Inference (no autodiff) takes the same forward.
            let plain = Device::flex();
            let conv_plain = conv.clone().valid();
            let x_plain = Tensor::<4>::from_data(x.to_data(), &plain);
            assert!(gemm_path(&conv_plain, &x_plain).is_some());
            let inferred = forward(&conv_plain, x_plain)
                .into_data()
                .iter::<f32>()
                .collect::<Vec<_>>();
            assert_eq!(
                inferred, ours.0,
                "inference output differs from training output"
            );
            for (what, a, b) in [
                ("output", &ours.0, &theirs.0),
                ("input gradient", &ours.1, &theirs.1),
                ("weight gradient", &ours.2, &theirs.2),
            ] {
                assert_eq!(a.len(), b.len(), "{what}");
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                        "kernel {kernel} stride {stride}: {what}[{i}] {p} vs {q}"
                    );
                }
            }
        }
    }

    /// Under a bf16 autocast scope the convolution takes bf16 GEMMs on AMX tiles where the CPU
    /// has them: output and both gradients within bf16 rounding of burn's f32 convolution, for
    /// stride-1 layers (their input gradient on the same GEMMs) and strided ones (theirs by
    /// col2im), with depths beyond one tile. Narrow 3x3 stride-1 layers take f32 Winograd
    /// instead (`BF16_WINOGRAD_MAX_CHANNELS`), their weight gradient up to 64 channels: those
    /// results stay within f32 rounding. Without AMX every result takes our f32 path.
    #[test]
    fn bf16_convolution_stays_within_bf16_rounding_of_f32() {
        use crate::model::precision::{Precision, autocast};
        let device = Device::flex().autodiff();
        device.seed(9);
        // An odd channel count (3, as a stem) leaves the last channel pair half empty; the
        // strided 3x3 and 1x1 (a downsample) take the col2im input gradient.
        // Which of output, weight gradient and input gradient stay in f32 (Winograd).
        let has_amx = super::super::amx::available();
        let (amx, narrow, weight_grad_only) = if has_amx {
            ([false; 3], [true; 3], [false, true, false])
        } else {
            ([true; 3], [true; 3], [true; 3])
        };
        for (cin, cout, kernel, stride, size, in_f32) in [
            (40, 72, 3, 1, 9, amx),
            (24, 40, 3, 2, 7, amx),
            (3, 72, 3, 1, 8, amx),
            (36, 24, 1, 2, 8, amx),
            (16, 16, 3, 1, 8, narrow),
            (40, 36, 3, 1, 8, weight_grad_only),
            // Rows of 16 and 32-channel blocks: the forward and input gradient convolve planes
            // of channel pairs on AMX (`amx::convolve_pair_planes`), no im2col, and the weight
            // gradient sums flat positions on AMX (`flat_weight_grad`).
            (32, 64, 3, 1, 16, amx),
            // Rows of 8 (flat positions past each row's end), the rest by im2col.
            (96, 64, 3, 1, 8, amx),
            // Stride 2 with output rows of 16: the forward from the phase planes of channel
            // pairs (`pair_planes_convolve`), the gradients by im2col and col2im.
            (32, 64, 3, 2, 32, amx),
        ] {
            let pad = kernel / 2;
            let conv = test_conv([cin, cout], kernel, stride, pad, &device);
            let x = Tensor::<4>::random(
                [5, cin, size, size],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let side = (size + 2 * pad - kernel) / stride + 1;
            let weights = Tensor::<4>::random(
                [5, cout, side, side],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let run = |bf16: bool| {
                let x = x.clone().detach().require_grad();
                let y = if bf16 {
                    let _bf16 = autocast(Precision::Bf16);
                    let path = gemm_path(&conv, &x).map(|(_, bf16)| bf16);
                    assert_eq!(path, Some(has_amx));
                    forward(&conv, x.clone())
                } else {
                    conv.forward(x.clone())
                };
                let grads = (y.clone() * weights.clone()).sum().backward();
                [
                    y,
                    x.grad(&grads).unwrap(),
                    conv.weight.grad(&grads).unwrap(),
                ]
                .map(|t| t.into_data().iter::<f32>().collect::<Vec<_>>())
            };
            let (low, exact) = (run(true), run(false));
            {
                // With the weights' packings and flipped kernels kept: the same, made once
                // and then reused.
                let _kept = super::super::step_cache::StepCacheScope::start();
                assert_eq!(
                    run(true),
                    low,
                    "{cin} -> {cout} stride {stride}, first kept"
                );
                assert_eq!(run(true), low, "{cin} -> {cout} stride {stride}, reused");
            }
            for ((what, low, exact), in_f32) in [
                ("output", &low[0], &exact[0]),
                ("weight gradient", &low[2], &exact[2]),
                ("input gradient", &low[1], &exact[1]),
            ]
            .into_iter()
            .zip(in_f32)
            {
                let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
                let error = low
                    .iter()
                    .zip(exact)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                let case = format!("{cin} -> {cout} stride {stride} {what}");
                if in_f32 {
                    // Winograd's F(4x4, 3x3) alone rounds to about 1e-5 of the scale (2.2e-5
                    // at 96 -> 64 in some draws: the tests share the device's generator).
                    assert!(error < 1e-4 * scale, "{case}: error {error} vs {scale}");
                } else {
                    assert!(error > 1e-5 * scale, "{case}: bf16 must round something");
                    assert!(error < 2e-2 * scale, "{case}: error {error} vs {scale}");
                }
            }
        }
    }
}
