//! The fused BatchNorm on flex: batch statistics, the norm (with its ReLU, or a residual's add
//! and ReLU) and the backward, over the NCHW tensor's per-channel runs on the rayon pool.

use super::super::{contiguous_f32, step_cache, tensor, wide, written_by_runs};
use super::FusedBatchNormOps;
use burn::backend::Flex;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;
use rayon::prelude::*;

/// `(batch, channels, spatial)` of an input of rank >= 2.
fn dims(shape: &Shape) -> (usize, usize, usize) {
    let (n, c) = (shape[0], shape[1]);
    (n, c, shape.num_elements() / (n * c).max(1))
}

/// `sum(f(values[i]))` with eight independent accumulators, so the compiler can vectorise it.
#[inline(always)]
fn sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The gradient `g` through a ReLU whose output was `y`: zero where `y` is not positive,
/// `g` elsewhere, NaN included (burn's `relu_backward`).
#[inline(always)]
fn through_relu(y: f32, g: f32) -> f32 {
    if y <= 0.0 { 0.0 } else { g }
}

/// Where a fused norm's ReLU lets the gradient through: nowhere masked (no ReLU), where the
/// kept output is positive, or where the output computed again from the input would be.
pub(in crate::model::fused) enum Relu<'a> {
    None,
    Output(&'a [f32]),
    Input(&'a ChannelNorm),
}

/// What a fused norm does to the values of each channel: `(v - mean) * scale + beta`,
/// `scale = gamma / sqrt(variance + epsilon)`, then the ReLU when `relu` (zero where not
/// positive, NaN kept, as burn's ReLU does, so that a blow-up still shows). Forward,
/// backward and a convolution that normalises its input ([`super::super::norm_conv`]) all
/// compute it here, so that they agree to the bit.
pub(in crate::model::fused) struct ChannelNorm {
    mean: Vec<f32>,
    scale: Vec<f32>,
    beta: Vec<f32>,
    relu: bool,
}

impl ChannelNorm {
    pub(in crate::model::fused) fn new(
        [mean, variance]: [&[f32]; 2],
        [gamma, beta]: [&[f32]; 2],
        epsilon: f64,
        relu: bool,
    ) -> Self {
        let scale = gamma
            .iter()
            .zip(variance)
            .map(|(&g, &v)| g / (v as f64 + epsilon).sqrt() as f32)
            .collect();
        ChannelNorm {
            mean: mean.to_vec(),
            scale,
            beta: beta.to_vec(),
            relu,
        }
    }

    /// From the tensors of a fused op's arguments.
    pub(in crate::model::fused) fn of(
        [mean, variance, gamma, beta]: [&FloatTensor<Flex>; 4],
        epsilon: f64,
        relu: bool,
    ) -> Self {
        let [mean, variance, gamma, beta] = [mean, variance, gamma, beta].map(contiguous_f32);
        Self::new([&mean, &variance], [&gamma, &beta], epsilon, relu)
    }

    /// The function of channel `ch`'s values, with `residual` added before the ReLU.
    #[inline(always)]
    pub(in crate::model::fused) fn channel(&self, ch: usize) -> impl Fn(f32, f32) -> f32 {
        let (m, k, b, relu) = (self.mean[ch], self.scale[ch], self.beta[ch], self.relu);
        move |v, residual| {
            let y = (v - m) * k + b + residual;
            if relu && y <= 0.0 { 0.0 } else { y }
        }
    }

    /// Channel `ch`'s `[mean, scale, beta]`: the norm is `(v - mean) scale + beta`.
    pub(in crate::model::fused) fn affine(&self, ch: usize) -> [f32; 3] {
        [self.mean[ch], self.scale[ch], self.beta[ch]]
    }

    /// Whether a ReLU follows the norm.
    pub(in crate::model::fused) fn relu(&self) -> bool {
        self.relu
    }

    /// Whether the ReLU of channel `ch` lets the gradient through at input value `v`: where
    /// the normalised value is positive or NaN (as burn's `relu_backward` decides from the
    /// output). Without the clamp of [`Self::channel`], so that the masked sums vectorise.
    #[inline(always)]
    fn passes(&self, ch: usize) -> impl Fn(f32) -> bool {
        let (m, k, b) = (self.mean[ch], self.scale[ch], self.beta[ch]);
        move |v| {
            let y = (v - m) * k + b;
            y > 0.0 || y.is_nan()
        }
    }

    /// The norm of an NCHW tensor.
    pub(in crate::model::fused) fn apply_to(&self, x: &FloatTensor<Flex>) -> FloatTensor<Flex> {
        let shape = x.layout().shape().clone();
        tensor(self.apply(&contiguous_f32(x), dims(&shape), None), shape)
    }

    /// The norm of an NCHW buffer of `(n, c, s)`, `residual` added before the ReLU.
    fn apply(
        &self,
        xs: &[f32],
        (_, c, s): (usize, usize, usize),
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        // SAFETY: run `i` writes one value per input value of run `i`, as many as its slots.
        unsafe {
            written_by_runs(xs.len(), s, |i, o| {
                let (f, run) = (self.channel(i % c), &xs[i * s..][..o.len()]);
                match residual {
                    None => {
                        for (o, &v) in o.iter_mut().zip(run) {
                            o.write(f(v, 0.0));
                        }
                    }
                    Some(residual) => {
                        let residual = &residual[i * s..][..o.len()];
                        for ((o, &v), &r) in o.iter_mut().zip(run).zip(residual) {
                            o.write(f(v, r));
                        }
                    }
                }
            })
        }
    }
}

/// The backward's two sums over run `at..at + dy.len()` of channel `ch`, `(sum(g),
/// sum((x - mean) g))`, where `g` is the output gradient where `relu` lets it through: in
/// AVX-512 registers where the CPU has them (written in the compiler's terms, with arrays
/// of lanes, the loop stayed scalar: its accumulators went to the stack, its mask to masked
/// scalar loads; 6.8% of the width-0.25 step's samples, against 2.9% in registers).
#[inline(always)]
fn gradient_sums(xs: &[f32], dy: &[f32], relu: &Relu, [ch, at]: [usize; 2], mean: f32) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if super::super::level() == super::super::Level::Avx512 {
        let mask = avx512::Mask::of(relu, [ch, at], dy.len());
        // SAFETY: the CPU has AVX-512F (checked).
        return unsafe { avx512::gradient_sums(xs, dy, mask, mean) };
    }
    scalar_gradient_sums(xs, dy, relu, [ch, at], mean)
}

/// [`gradient_sums`] in eight accumulators each, which the compiler leaves scalar.
#[inline(always)]
fn scalar_gradient_sums(
    xs: &[f32],
    dy: &[f32],
    relu: &Relu,
    [ch, at]: [usize; 2],
    mean: f32,
) -> [f32; 2] {
    let (mut sum, mut centred) = ([0f32; 8], [0f32; 8]);
    let mut add = |lane: usize, x: f32, g: f32| {
        sum[lane] += g;
        centred[lane] += (x - mean) * g;
    };
    match relu {
        Relu::None => {
            for (i, (&x, &g)) in xs.iter().zip(dy).enumerate() {
                add(i % 8, x, g);
            }
        }
        Relu::Output(ys) => {
            let ys = &ys[at..][..dy.len()];
            for (i, ((&x, &g), &y)) in xs.iter().zip(dy).zip(ys).enumerate() {
                add(i % 8, x, through_relu(y, g));
            }
        }
        Relu::Input(norm) => {
            let passes = norm.passes(ch);
            for (i, (&x, &g)) in xs.iter().zip(dy).enumerate() {
                add(i % 8, x, if passes(x) { g } else { 0.0 });
            }
        }
    }
    [sum.iter().sum(), centred.iter().sum()]
}

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Per channel, the sums over the batch of `f(channel, offset)`, where `offset` starts that
/// sample's run of `spatial` values in the NCHW buffer. In memory order, the samples split
/// into parts (in parallel, each with sums of every channel, added at the end): one channel
/// at a time over all samples read runs `C x spatial` values apart, a page each for the
/// small images of the deep layers (`spatial` 16 or 64), which the prefetcher does not
/// follow. A fixed number of parts, so that the sums do not depend on the threads.
fn per_channel<const K: usize>(
    (n, c, s): (usize, usize, usize),
    f: impl Fn(usize, usize) -> [f32; K] + Sync,
) -> Vec<[f64; K]> {
    const PARTS: usize = 16;
    let parts = n.clamp(1, PARTS);
    let sums = |part: usize| {
        let mut totals = vec![[0f64; K]; c];
        wide(
            #[inline(always)]
            || {
                for b in part * n / parts..(part + 1) * n / parts {
                    for (ch, total) in totals.iter_mut().enumerate() {
                        for (t, v) in total.iter_mut().zip(f(ch, (b * c + ch) * s)) {
                            *t += v as f64;
                        }
                    }
                }
            },
        );
        totals
    };
    let partials: Vec<Vec<[f64; K]>> = (0..parts).into_par_iter().map(sums).collect();
    let mut partials = partials.into_iter();
    let mut totals = partials.next().expect("at least one part");
    for part in partials {
        for (total, sums) in totals.iter_mut().zip(&part) {
            for (t, v) in total.iter_mut().zip(sums) {
                *t += v;
            }
        }
    }
    totals
}

impl FusedBatchNormOps for Flex {
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        forward(x, gamma, beta, epsilon, relu, None)
    }

    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        forward(x, gamma, beta, epsilon, true, Some(residual))
    }

    fn fused_batch_norm_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let xs = contiguous_f32(&x);
        backward(
            &xs,
            shape_of(&x),
            gamma,
            mean,
            variance,
            epsilon,
            output_grad,
            Relu::None,
        )
    }

    /// The residual's gradient masked in parallel (burn's `relu_backward` runs on one
    /// thread below 4 Mi values: every residual block of a narrow model), then the norm's
    /// backward from it.
    fn fused_batch_norm_add_relu_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
        output: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let shape = shape_of(&x);
        let (ys, dy) = (contiguous_f32(&output), contiguous_f32(&output_grad));
        // SAFETY: run `i` writes one value per output value of run `i`.
        let masked = unsafe {
            written_by_runs(ys.len(), MASK_RUN, |i, out| {
                let at = i * MASK_RUN;
                let (ys, dy) = (&ys[at..][..out.len()], &dy[at..][..out.len()]);
                for ((o, &y), &g) in out.iter_mut().zip(ys).zip(dy) {
                    o.write(through_relu(y, g));
                }
            })
        };
        let residual_grad = tensor(masked, shape.clone());
        let xs = contiguous_f32(&x);
        let (x_grad, gamma_grad, beta_grad) = backward(
            &xs,
            shape,
            gamma,
            mean,
            variance,
            epsilon,
            residual_grad.clone(),
            Relu::None,
        );
        (x_grad, gamma_grad, beta_grad, residual_grad)
    }

    fn fused_batch_norm_relu_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
        output: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (xs, ys) = (contiguous_f32(&x), contiguous_f32(&output));
        let relu = Relu::Output(&ys);
        backward(
            &xs,
            shape_of(&x),
            gamma,
            mean,
            variance,
            epsilon,
            output_grad,
            relu,
        )
    }
}

/// Values per parallel run of the residual's masked gradient.
const MASK_RUN: usize = 1 << 14;

fn shape_of(x: &FloatTensor<Flex>) -> Shape {
    x.layout().shape().clone()
}

/// Both forward passes: the batch statistics, then the norm.
fn forward(
    x: FloatTensor<Flex>,
    gamma: FloatTensor<Flex>,
    beta: FloatTensor<Flex>,
    epsilon: f64,
    relu: bool,
    residual: Option<FloatTensor<Flex>>,
) -> (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>) {
    let shape = shape_of(&x);
    let xs = contiguous_f32(&x);
    let (norm, mean, variance) = batch_norm_of(&x, &xs, [&gamma, &beta], epsilon, relu);
    let residual = residual.as_ref().map(contiguous_f32);
    let out = norm.apply(&xs, dims(&shape), residual.as_deref());
    (tensor(out, shape), mean, variance)
}

/// The norm that the batch statistics of `x` (NCHW; `xs` its values) make with `gamma` and
/// `beta`, and those statistics (mean, biased variance) as the fused ops return them: from
/// the sums the convolution that made `x` kept ([`step_cache::take_sums`]), else from a
/// pass over `xs`.
pub(in crate::model::fused) fn batch_norm_of(
    x: &FloatTensor<Flex>,
    xs: &[f32],
    [gamma, beta]: [&FloatTensor<Flex>; 2],
    epsilon: f64,
    relu: bool,
) -> (ChannelNorm, FloatTensor<Flex>, FloatTensor<Flex>) {
    let (n, c, s) = dims(x.layout().shape());
    let [mean, variance] = match step_cache::take_sums(x) {
        Some(sums) if sums.len() == n * c => statistics_of_sums(&sums, (n, c, s)),
        _ => statistics(xs, (n, c, s)),
    };
    let (gamma, beta) = (contiguous_f32(gamma), contiguous_f32(beta));
    let norm = ChannelNorm::new([&mean, &variance], [&gamma, &beta], epsilon, relu);
    let c = mean.len();
    let (mean, variance) = (
        tensor(mean, Shape::new([c])),
        tensor(variance, Shape::new([c])),
    );
    (norm, mean, variance)
}

/// Per channel, the mean and biased variance of an NCHW buffer of `(n, c, s)`, in one pass:
/// the [`sample_sums`] of each sample, combined by [`statistics_of_sums`].
fn statistics(xs: &[f32], (n, c, s): (usize, usize, usize)) -> [Vec<f32>; 2] {
    let mut sums = vec![[0f32; 3]; n * c];
    sums.par_chunks_mut(c)
        .zip(xs.par_chunks_exact(c * s))
        .for_each(|(sums, sample)| sample_sums(sample, s, sums));
    statistics_of_sums(&sums, (n, c, s))
}

/// Per channel of one sample (`[C, spatial]`, `C` = `out.len()`), the sums of its values
/// `v` about the first, `k`: `[k, sum(v - k), sum((v - k)^2)]`, in f32 over one run in
/// cache. About the mean itself (a second pass) the variance would cancel nothing; about
/// zero, `E[x^2] - E[x]^2` would cancel most of its digits where the mean is large against
/// the spread. About `k`, a value near the mean, it loses `(mean - k)^2 / variance` times
/// the rounding of the sums, a few units in the last place for a `k` a few deviations off.
pub(in crate::model::fused) fn sample_sums(sample: &[f32], spatial: usize, out: &mut [[f32; 3]]) {
    #[cfg(target_arch = "x86_64")]
    if spatial.is_multiple_of(16) && super::super::level() == super::super::Level::Avx512 {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::sample_sums(sample, spatial, out) };
    }
    wide(
        #[inline(always)]
        || {
            for (sums, run) in out.iter_mut().zip(sample.chunks_exact(spatial)) {
                let k = run[0];
                *sums = [
                    k,
                    sum_of(run, |v| v - k),
                    sum_of(run, |v| (v - k) * (v - k)),
                ];
            }
        },
    );
}

/// Per channel, the mean and biased variance from the [`sample_sums`] of each sample
/// (`[n, c]`, runs of `s` values): each sample's sums moved from its own first value to
/// the first sample's, and added in f64, in sample order (the same whichever pass made
/// them).
fn statistics_of_sums(sums: &[[f32; 3]], (n, c, s): (usize, usize, usize)) -> [Vec<f32>; 2] {
    let (count, run) = ((n * s) as f64, s as f64);
    (0..c)
        .map(|ch| {
            let k = f64::from(sums[ch][0]);
            let (mut sum, mut squares) = (0f64, 0f64);
            for sample in sums.chunks_exact(c) {
                let [k_b, sum_b, squares_b] = sample[ch].map(f64::from);
                let d = k_b - k;
                sum += sum_b + run * d;
                squares += squares_b + 2.0 * d * sum_b + run * d * d;
            }
            let offset = sum / count;
            let variance = (squares / count - offset * offset).max(0.0);
            ((k + offset) as f32, variance as f32)
        })
        .unzip::<_, _, Vec<f32>, Vec<f32>>()
        .into()
}

/// Both backward passes over the input `xs` of `shape`, the gradient masked as `relu` says.
#[allow(clippy::too_many_arguments)]
pub(in crate::model::fused) fn backward(
    xs: &[f32],
    shape: Shape,
    gamma: FloatTensor<Flex>,
    mean: FloatTensor<Flex>,
    variance: FloatTensor<Flex>,
    epsilon: f64,
    output_grad: FloatTensor<Flex>,
    relu: Relu,
) -> (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>) {
    let (n, c, s) = dims(&shape);
    let count = (n * s) as f32;
    let dy = contiguous_f32(&output_grad);
    let (gamma, mean, variance) = (
        contiguous_f32(&gamma),
        contiguous_f32(&mean),
        contiguous_f32(&variance),
    );
    let inv_std: Vec<f32> = variance
        .iter()
        .map(|&v| 1.0 / (v as f64 + epsilon).sqrt() as f32)
        .collect();
    // One pass for both sums (`g` is `dy`, masked by the ReLU when there is one).
    let (sum_dy, sum_dy_centred): (Vec<f32>, Vec<f32>) = per_channel((n, c, s), |ch, at| {
        let run = at..at + s;
        gradient_sums(&xs[run.clone()], &dy[run], &relu, [ch, at], mean[ch])
    })
    .into_iter()
    .map(|[sum, centred]| (sum as f32, centred as f32))
    .unzip();
    // dx = gamma inv_std (dy - mean(dy) - xhat mean(dy xhat)), as a*dy - b*(x - mean) - k.
    let coefficients: Vec<(f32, f32, f32)> = (0..c)
        .map(|ch| {
            let a = gamma[ch] * inv_std[ch];
            let b = a * inv_std[ch] * inv_std[ch] * sum_dy_centred[ch] / count;
            (a, b, a * sum_dy[ch] / count)
        })
        .collect();
    // SAFETY: run `i` writes one value per input value of run `i`, as many as its slots.
    let dx = unsafe {
        written_by_runs(xs.len(), s, |i, out| {
            let (run, grads) = (&xs[i * s..][..out.len()], &dy[i * s..][..out.len()]);
            let ch = i % c;
            let (a, b, k) = coefficients[ch];
            let m = mean[ch];
            match &relu {
                Relu::None => {
                    for ((o, &v), &g) in out.iter_mut().zip(run).zip(grads) {
                        o.write(a * g - b * (v - m) - k);
                    }
                }
                Relu::Output(ys) => {
                    let ys = &ys[i * s..][..out.len()];
                    for (((o, &v), &g), &y) in out.iter_mut().zip(run).zip(grads).zip(ys) {
                        let g = through_relu(y, g);
                        o.write(a * g - b * (v - m) - k);
                    }
                }
                Relu::Input(norm) => {
                    let passes = norm.passes(ch);
                    for ((o, &v), &g) in out.iter_mut().zip(run).zip(grads) {
                        let g = if passes(v) { g } else { 0.0 };
                        o.write(a * g - b * (v - m) - k);
                    }
                }
            }
        })
    };
    let gamma_grad: Vec<f32> = (0..c).map(|ch| sum_dy_centred[ch] * inv_std[ch]).collect();
    (
        tensor(dx, shape),
        tensor(gamma_grad, Shape::new([c])),
        tensor(sum_dy, Shape::new([c])),
    )
}

#[cfg(test)]
mod tests;
