//! The narrow layers on the direct kernels ([`direct`]): 1x1 convolutions pointwise and 3x3
//! ones on padded planes, forward and weight gradient.

use super::geometry::Geometry;
use super::split_sums::summed_by_threads;
use super::winograd_path::BF16_WINOGRAD_MAX_CHANNELS;
use super::{OutputSums, prefix, with_scratch, written_by_samples};
use crate::model::fused::batch_norm::flex::ChannelNorm;
use crate::model::fused::direct;

/// The most channels on its narrower side (in or out) at which a 3x3 convolution takes the
/// direct kernels (`takes_direct`) rather than Winograd: in the width-0.25
/// step, the 32-channel layers' forwards took 2.5-2.6 ms a call direct against 1.9-2.2
/// by Winograd.
pub(super) const DIRECT_MAX_CHANNELS: usize = 16;

/// Multiply-adds per sample up to which a 1x1 convolution takes
/// [`direct::pointwise_sample`] instead of gemm. The downsamples of a width-0.25 ResNet-18
/// (128 Ki each, forward and input gradient) gain (`byol bench conv`: 16 -> 32 forward
/// 0.60-0.66 -> 0.45 ms with the subsample, 32 -> 64 0.44-0.48 -> 0.29-0.31, input gradients
/// 0.75-0.89 -> 0.53-0.62 and 0.42-0.44 -> 0.32-0.35); width 1's (2 Mi) ran no faster.
pub(super) const POINTWISE_MAX_WORK: usize = 1 << 18;

/// Whether [`convolve`](super::convolve) takes [`pointwise_convolve`]: an f32 1x1 convolution at
/// stride 1 (a strided one reads its subsample) with no padding that [`direct::pointwise_applies`]
/// to, of at most [`POINTWISE_MAX_WORK`] multiply-adds per sample.
pub(super) fn takes_pointwise(g: &Geometry, bf16: bool) -> bool {
    [g.kh, g.kw] == [1, 1]
        && g.stride == [1, 1]
        && g.pad == [0, 0]
        && direct::pointwise_applies(g.cout, g.positions())
        && g.cin * g.cout * g.positions() <= POINTWISE_MAX_WORK
        && !bf16
}

/// [`convolve`](super::convolve) by [`direct::pointwise_sample`], sample by sample in parallel
/// (each through `norm` into this thread's scratch first, when given), its output sums taken while
/// it is in cache.
pub(super) fn pointwise_convolve(
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

/// Whether [`convolve`](super::convolve) takes [`direct_convolve`]: a 3x3, padding-1 convolution of
/// stride 1 or 2 that [`direct::applies`] to, with at most [`DIRECT_MAX_CHANNELS`] channels on one
/// side (a stem's three inputs) and, in bf16, as narrow as
/// [`takes_winograd`](super::winograd_path::takes_winograd) allows.
pub(super) fn takes_direct(g: &Geometry, bf16: bool) -> bool {
    [g.kh, g.kw] == [3, 3]
        && (g.stride == [1, 1] || g.stride == [2, 2])
        && g.pad == [1, 1]
        && direct::applies(g.cout, g.wo)
        && g.cin.min(g.cout) <= DIRECT_MAX_CHANNELS
        && (!bf16 || g.cin.max(g.cout) <= BF16_WINOGRAD_MAX_CHANNELS)
}

/// [`convolve`](super::convolve) by [`direct::forward_sample`], sample by sample in parallel: each
/// padded (through `norm`) into this thread's scratch, convolved, and its output sums taken while
/// it is in cache.
pub(super) fn direct_convolve(
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

/// [`weight_grad`](super::weight_grad) by [`direct::add_gradient_sample`]: each thread adds its
/// share of the samples (in one call: each sample padded through `norm` into the thread's scratch,
/// its output gradient copied to a cache line's start) into sums of its own, lane by lane, which it
/// adds up once at the end.
pub(super) fn direct_weight_grad(
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
pub(super) fn direct_padded<'a>(
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
