//! Copies between layouts: strided picks, channels-last blocks, and a strided 1x1
//! convolution's subsample of its input and spread of its input gradient.

use super::geometry::Geometry;
use super::prefix;
use crate::model::fused::batch_norm::flex::ChannelNorm;
use crate::model::fused::{filled_by_runs, tensor, transpose16, winograd, written_by_runs};
use burn::backend::Flex;
use burn::backend::ops::ConvOptions;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;

/// `out[k] = f(values[step * k])` for every `k` of `out`: at a step of 2 by
/// [`every_second`].
#[inline(always)]
pub(super) fn every_nth<T>(out: &mut [T], values: &[f32], step: usize, f: impl Fn(f32) -> T) {
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
pub(super) fn every_second<T>(out: &mut [T], inputs: &[f32], f: impl Fn(f32) -> T) {
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
pub(super) fn copy_rows<T: Copy>(dst: &mut [T], src: &[T], width: usize, step: usize) {
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
pub(super) fn channels_last<'a>(
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

/// Whether a convolution reads only every `stride`-th row and column of its input (a 1x1
/// kernel, no padding, a stride, as a ResNet's downsample): it is then the stride-1
/// convolution of that subsample ([`subsampled`]), its weight gradient that one's, and its
/// input gradient that one's spread back ([`spread`]). Timed alone at width 1 (f32, ms):
/// 64 -> 128 channels at 32x32 forward 3.47, weight gradient 7.36, input gradient 5.05
/// through the strided im2col and col2im.
pub(super) fn reads_a_subsample(g: &Geometry) -> bool {
    [g.kh, g.kw] == [1, 1] && g.pad == [0, 0] && g.stride != [1, 1]
}

/// Stride 1, no padding: the options of a subsample's convolution.
pub(super) fn unstrided() -> ConvOptions<2> {
    ConvOptions::new([1, 1], [0, 0], [1, 1], 1)
}

/// The values a [`reads_a_subsample`] convolution reads, `[N, C_in, H_out, W_out]`.
pub(super) fn subsampled(xs: &[f32], g: &Geometry) -> FloatTensor<Flex> {
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
pub(super) fn spread(sub: &[f32], g: &Geometry) -> FloatTensor<Flex> {
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
