//! BatchNorm in training mode as one fused operation on flex.
//!
//! burn 0.22's default `batch_norm_train` (which flex does not specialise) builds the batch
//! statistics from `swap_dims(0, 1)` + reshape copies and several element-wise passes, forward
//! and backward; profiling put about a tenth of the BYOL step in those copies alone. Here the
//! statistics are per-channel sums over the contiguous `H x W` runs of an NCHW tensor: forward
//! reads the input twice and writes the output once, backward reads input and gradient twice
//! and writes the input gradient once, channels split over the rayon pool. The ReLU after a
//! norm ([`forward_relu`]), or a residual block's add + ReLU ([`forward_add_relu`]), is fused
//! in: the output is clamped (and the residual added) in the same pass, and the backward masks
//! the gradient as it reads it. That saves the ReLU's and the add's passes and, more, the
//! tensors burn's ReLU keeps for its backward (its input: the norm's output or the sum).
//! burn's `BatchNorm` module keeps the parameters and running statistics; these functions only
//! replace its training forward, and burn's own ops stay the reference in the tests.

use burn::backend::backend_extension;
use burn::backend::tensor::FloatTensor;
use burn::nn::BatchNorm;
use burn::tensor::Tensor;

/// The fused training-mode BatchNorm, for the backends that implement it.
#[backend_extension(Flex, Autodiff)]
pub trait FusedBatchNormOps: burn::backend::Backend {
    /// `(output, mean, biased variance)` of an NCHW input normalised with its batch statistics,
    /// the output passed through a ReLU when `relu`.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `relu(bn(x) + residual)`, the end of a residual block, as `(output, mean, biased
    /// variance)`; its backward masks the gradient with burn's `relu_backward` and runs
    /// [`fused_batch_norm_train_backward`](FusedBatchNormOps::fused_batch_norm_train_backward).
    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `(input, gamma, beta)` gradients given the output gradient.
    fn fused_batch_norm_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The backward of [`fused_batch_norm_add_relu_train`](FusedBatchNormOps::fused_batch_norm_add_relu_train)
    /// from its `output`: `(input, gamma, beta, residual)` gradients, the residual's being the
    /// output gradient where the output is positive (burn's `relu_backward`).
    #[allow(clippy::too_many_arguments)]
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
    );

    /// The same with a ReLU fused in: `output` is the forward's, and the gradient flows where
    /// it is positive.
    fn fused_batch_norm_relu_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
        output: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `bn` applied to an NCHW batch: the fused path when training on flex in f32, burn's
/// `BatchNorm::forward` otherwise. Running statistics are updated exactly as burn does.
pub fn forward(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    normalize(bn, x, Activation::None)
}

/// `relu(bn(x))`, fused as [`forward`] is.
pub fn forward_relu(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    normalize(bn, x, Activation::Relu)
}

/// `relu(bn(x) + residual)`, fused as [`forward`] is: the sum is never stored.
pub fn forward_add_relu(bn: &BatchNorm, x: Tensor<4>, residual: Tensor<4>) -> Tensor<4> {
    normalize(bn, x, Activation::AddRelu(Box::new(residual)))
}

/// What follows the norm.
enum Activation {
    None,
    Relu,
    AddRelu(Box<Tensor<4>>),
}

fn normalize(bn: &BatchNorm, x: Tensor<4>, activation: Activation) -> Tensor<4> {
    use burn::tensor::activation::relu;
    if !takes_fused_path(bn, &x) {
        let y = if super::enabled() && !in_training(bn, &x) {
            with_running_statistics(bn, x)
        } else {
            bn.forward(x)
        };
        return match activation {
            Activation::None => y,
            Activation::Relu => relu(y),
            Activation::AddRelu(residual) => relu(y + *residual),
        };
    }
    let device = x.device();
    let (x, gamma, beta) = (
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
    );
    type Ops = burn::backend::Dispatch;
    let (output, mean, variance) = match activation {
        Activation::None => Ops::fused_batch_norm_train(x, gamma, beta, bn.epsilon, false),
        Activation::Relu => Ops::fused_batch_norm_train(x, gamma, beta, bn.epsilon, true),
        Activation::AddRelu(residual) => Ops::fused_batch_norm_add_relu_train(
            x,
            gamma,
            beta,
            residual.into_dispatch(),
            bn.epsilon,
        ),
    };
    record_batch_statistics(bn, mean, variance, &device);
    Tensor::from_dispatch(output)
}

/// Moves `bn`'s running statistics towards a batch's `mean` and biased `variance` (as returned
/// by the fused ops), exactly as burn's `BatchNorm` does in training.
pub(super) fn record_batch_statistics(
    bn: &BatchNorm,
    mean: burn::backend::tensor::FloatTensor<burn::backend::Dispatch>,
    variance: burn::backend::tensor::FloatTensor<burn::backend::Dispatch>,
    device: &burn::tensor::Device,
) {
    let mean = Tensor::<1>::from_dispatch(mean).detach();
    let variance = Tensor::<1>::from_dispatch(variance).detach();
    let running_mean = bn.running_mean.value_sync().to_device(device);
    let running_var = bn.running_var.value_sync().to_device(device);
    bn.running_mean.update(
        running_mean
            .mul_scalar(1.0 - bn.momentum)
            .add(mean.mul_scalar(bn.momentum))
            .detach(),
    );
    bn.running_var.update(
        running_var
            .mul_scalar(1.0 - bn.momentum)
            .add(variance.mul_scalar(bn.momentum))
            .detach(),
    );
}

/// Whether burn's `BatchNorm::forward` takes its training path: an autodiff device and the
/// layer's flag.
fn in_training(bn: &BatchNorm, x: &Tensor<4>) -> bool {
    x.device().is_autodiff() && bn.training.is_enabled()
}

/// BatchNorm with the running statistics (inference) as one scale and shift per channel: two
/// passes over `x` where burn's `batch_norm` makes four.
fn with_running_statistics(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let channels = bn.gamma.dims()[0];
    let mean = bn.running_mean.value().to_device(&device);
    let variance = bn.running_var.value().to_device(&device);
    let scale = bn.gamma.val() / variance.add_scalar(bn.epsilon).sqrt();
    let shift = bn.beta.val() - mean * scale.clone();
    x * scale.reshape([1, channels, 1, 1]) + shift.reshape([1, channels, 1, 1])
}

/// Training mode (as burn decides it: an autodiff device and the layer's flag) on flex, f32.
pub(super) fn takes_fused_path(bn: &BatchNorm, x: &Tensor<4>) -> bool {
    let device = x.device();
    super::enabled()
        && in_training(bn, x)
        && x.dtype() == burn::tensor::DType::F32
        && super::is_flex(&device)
}

pub(super) mod flex {
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
    fn gradient_sums(
        xs: &[f32],
        dy: &[f32],
        relu: &Relu,
        [ch, at]: [usize; 2],
        mean: f32,
    ) -> [f32; 2] {
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
    mod avx512 {
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
        pub(super) unsafe fn gradient_sums(
            xs: &[f32],
            dy: &[f32],
            mask: Mask,
            mean: f32,
        ) -> [f32; 2] {
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
    }

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
    pub(in crate::model::fused) fn sample_sums(
        sample: &[f32],
        spatial: usize,
        out: &mut [[f32; 3]],
    ) {
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
    mod tests {
        use super::statistics;

        /// The backward's sums in AVX-512 registers against the scalar loop, for each ReLU
        /// mask: runs of 1 to 100 values (partial last vectors), zeros, negative and NaN
        /// outputs (a NaN output lets its gradient through), gradients that are NaN where the
        /// mask stops them (they must not leak into the sums).
        #[cfg(target_arch = "x86_64")]
        #[test]
        fn vector_gradient_sums_match_the_scalar_ones() {
            use super::{ChannelNorm, Relu, avx512, gradient_sums, scalar_gradient_sums};
            if super::super::super::level() != super::super::super::Level::Avx512 {
                eprintln!("no AVX-512 on this CPU: the vector sums are not exercised here");
                return;
            }
            let norm = ChannelNorm::new([&[0.3], &[2.0]], [&[1.5], &[-0.2]], 1e-5, true);
            let passes = norm.passes(0);
            for len in [1usize, 7, 15, 16, 17, 33, 100] {
                let value = |i: usize, seed: usize| ((i * 37 + seed * 11) % 23) as f32 / 5.0 - 2.2;
                let xs: Vec<f32> = (0..len).map(|i| value(i, 1)).collect();
                let ys: Vec<f32> = (0..len)
                    .map(|i| match i % 5 {
                        0 => 0.0,
                        1 => f32::NAN,
                        _ => value(i, 2),
                    })
                    .collect();
                for relu in [Relu::None, Relu::Output(&ys), Relu::Input(&norm)] {
                    // NaN gradients wherever this mask stops them.
                    let dy: Vec<f32> = (0..len)
                        .map(|i| {
                            let stopped = match &relu {
                                Relu::None => false,
                                Relu::Output(ys) => ys[i] <= 0.0,
                                Relu::Input(_) => !passes(xs[i]),
                            };
                            if stopped { f32::NAN } else { value(i, 3) }
                        })
                        .collect();
                    let scalar = scalar_gradient_sums(&xs, &dy, &relu, [0, 0], 0.1);
                    let vector = gradient_sums(&xs, &dy, &relu, [0, 0], 0.1);
                    let mask = avx512::Mask::of(&relu, [0, 0], len);
                    // SAFETY: the CPU has AVX-512F (checked above).
                    let direct = unsafe { avx512::gradient_sums(&xs, &dy, mask, 0.1) };
                    assert_eq!(vector, direct);
                    for (v, s) in vector.iter().zip(scalar) {
                        assert!(
                            v.is_finite() && (v - s).abs() <= 1e-5 * (1.0 + s.abs()),
                            "{len}: {v} vs {s}"
                        );
                    }
                }
            }
        }

        /// The one-pass mean and variance against the two-pass definition in f64, where the
        /// mean is large against the spread (where `E[x^2] - E[x]^2` in f32 would return
        /// noise) and each channel's first value lies several deviations from its mean; runs
        /// of 37 values (the general sums) and of 16 and 64 (on AVX-512, in vectors).
        #[test]
        fn one_pass_statistics_match_the_two_pass_definition() {
            for s in [37, 16, 64] {
                let (n, c) = (5, 3);
                let mut state = 7u64;
                let mut uniform = || {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 40) as f64 / (1u64 << 24) as f64 - 0.5
                };
                let (means, spreads) = ([1000.0, -3.0, 0.0], [0.01, 2.0, 1e-3]);
                let mut xs: Vec<f32> = (0..n * c * s)
                    .map(|i| {
                        let ch = i / s % c;
                        (means[ch] + spreads[ch] * uniform()) as f32
                    })
                    .collect();
                // First values 5 (uniform) deviations off.
                for ch in 0..c {
                    xs[ch * s] = (means[ch] + spreads[ch] * 1.5) as f32;
                }
                let [mean, variance] = statistics(&xs, (n, c, s));
                for ch in 0..c {
                    let values: Vec<f64> = (0..n)
                        .flat_map(|b| xs[(b * c + ch) * s..][..s].iter().map(|&v| f64::from(v)))
                        .collect();
                    let m = values.iter().sum::<f64>() / values.len() as f64;
                    let v =
                        values.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / values.len() as f64;
                    assert!(
                        (f64::from(mean[ch]) - m).abs() <= 1e-6 * m.abs().max(spreads[ch]),
                        "runs of {s}, channel {ch}: mean {} vs {m}",
                        mean[ch]
                    );
                    assert!(
                        (f64::from(variance[ch]) - v).abs() <= 1e-4 * v,
                        "runs of {s}, channel {ch}: variance {} vs {v}",
                        variance[ch]
                    );
                }
            }
        }
    }
}

mod autodiff {
    use super::FusedBatchNormOps;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{AutodiffBackend, Backend};
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn_autodiff::grads::Gradients;
    use burn_autodiff::ops::{Backward, Ops, OpsKind};

    #[derive(Debug)]
    struct FusedBatchNormTrain;

    impl<B: Backend + FusedBatchNormOps> Backward<B, 3> for FusedBatchNormTrain {
        /// Input, gamma, the batch statistics the forward computed, epsilon, and the output
        /// when a ReLU was fused in.
        type State = (
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            f64,
            Option<FloatTensor<B>>,
        );

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_gamma, node_beta] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let (x, gamma, mean, variance, epsilon, relu_output) = ops.state;
            let (x_grad, gamma_grad, beta_grad) = match relu_output {
                None => B::fused_batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad),
                Some(output) => B::fused_batch_norm_relu_train_backward(
                    x, gamma, mean, variance, epsilon, grad, output,
                ),
            };
            if let Some(node) = node_x {
                grads.register::<B>(node.id, x_grad);
            }
            if let Some(node) = node_gamma {
                grads.register::<B>(node.id, gamma_grad);
            }
            if let Some(node) = node_beta {
                grads.register::<B>(node.id, beta_grad);
            }
        }
    }

    #[derive(Debug)]
    struct FusedBatchNormAddReluTrain;

    impl<B: Backend + FusedBatchNormOps> Backward<B, 4> for FusedBatchNormAddReluTrain {
        /// Input, gamma, the batch statistics, epsilon, and the output.
        type State = (
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            f64,
            FloatTensor<B>,
        );

        fn backward(
            self,
            ops: Ops<Self::State, 4>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_gamma, node_beta, node_residual] = ops.parents;
            let (x, gamma, mean, variance, epsilon, output) = ops.state;
            let grad = grads.consume::<B>(&ops.node);
            let (x_grad, gamma_grad, beta_grad, residual_grad) =
                B::fused_batch_norm_add_relu_train_backward(
                    x, gamma, mean, variance, epsilon, grad, output,
                );
            for (node, value) in [
                (node_x, x_grad),
                (node_gamma, gamma_grad),
                (node_beta, beta_grad),
                (node_residual, residual_grad),
            ] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, value);
                }
            }
        }
    }

    impl<B: Backend + FusedBatchNormOps, C: CheckpointStrategy> FusedBatchNormOps for Autodiff<B, C> {
        fn fused_batch_norm_add_relu_train(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            residual: FloatTensor<Self>,
            epsilon: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let nodes = [x.node(), gamma.node(), beta.node(), residual.node()];
            let (x, gamma, beta, residual) = (
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                residual.into_primitive(),
            );
            let (output, mean, variance) = B::fused_batch_norm_add_relu_train(
                x.clone(),
                gamma.clone(),
                beta,
                residual,
                epsilon,
            );
            let output = match FusedBatchNormAddReluTrain
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = (
                        x,
                        gamma,
                        mean.clone(),
                        variance.clone(),
                        epsilon,
                        output.clone(),
                    );
                    prep.finish(state, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            (output, Self::from_inner(mean), Self::from_inner(variance))
        }

        fn fused_batch_norm_train(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
            relu: bool,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let nodes = [x.node(), gamma.node(), beta.node()];
            let (x, gamma, beta) = (
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
            );
            let (output, mean, variance) =
                B::fused_batch_norm_train(x.clone(), gamma.clone(), beta, epsilon, relu);
            let output = match FusedBatchNormTrain
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let relu_output = relu.then(|| output.clone());
                    let state = (
                        x,
                        gamma,
                        mean.clone(),
                        variance.clone(),
                        epsilon,
                        relu_output,
                    );
                    prep.finish(state, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            (output, Self::from_inner(mean), Self::from_inner(variance))
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
        fn fused_batch_norm_train_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            mean: FloatTensor<Self>,
            variance: FloatTensor<Self>,
            epsilon: f64,
            output_grad: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let (dx, dgamma, dbeta) = B::fused_batch_norm_train_backward(
                Self::inner(x),
                Self::inner(gamma),
                Self::inner(mean),
                Self::inner(variance),
                epsilon,
                Self::inner(output_grad),
            );
            (
                Self::from_inner(dx),
                Self::from_inner(dgamma),
                Self::from_inner(dbeta),
            )
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
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
            let (dx, dgamma, dbeta, dresidual) = B::fused_batch_norm_add_relu_train_backward(
                Self::inner(x),
                Self::inner(gamma),
                Self::inner(mean),
                Self::inner(variance),
                epsilon,
                Self::inner(output_grad),
                Self::inner(output),
            );
            (
                Self::from_inner(dx),
                Self::from_inner(dgamma),
                Self::from_inner(dbeta),
                Self::from_inner(dresidual),
            )
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
        fn fused_batch_norm_relu_train_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            mean: FloatTensor<Self>,
            variance: FloatTensor<Self>,
            epsilon: f64,
            output_grad: FloatTensor<Self>,
            output: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let (dx, dgamma, dbeta) = B::fused_batch_norm_relu_train_backward(
                Self::inner(x),
                Self::inner(gamma),
                Self::inner(mean),
                Self::inner(variance),
                epsilon,
                Self::inner(output_grad),
                Self::inner(output),
            );
            (
                Self::from_inner(dx),
                Self::from_inner(dgamma),
                Self::from_inner(dbeta),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution};

    /// Forward output, running statistics and the gradients of input, gamma and beta, against
    /// burn's own training-mode BatchNorm, alone, with a ReLU after it, and with a residual
    /// added before the ReLU.
    #[test]
    fn matches_burns_batch_norm_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(3);
        // Non-trivial gamma/beta: train-like values, not the 1/0 of a fresh layer.
        let gamma = Tensor::<1>::random([6], Distribution::Uniform(0.5, 1.5), &device);
        let beta = Tensor::<1>::random([6], Distribution::Uniform(-0.5, 0.5), &device);
        let make = |gamma: &Tensor<1>, beta: &Tensor<1>| {
            let mut bn = BatchNormConfig::new(6).init(&device);
            bn.gamma = burn::module::Param::from_tensor(gamma.clone().detach());
            bn.beta = burn::module::Param::from_tensor(beta.clone().detach());
            bn
        };
        let (ours, theirs) = (make(&gamma, &beta), make(&gamma, &beta));
        let x = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(1.5, 2.0), &device);
        let weights = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(0.0, 1.0), &device);

        // A residual added before the ReLU, as at the end of a block.
        let residual = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(0.0, 1.0), &device);
        let run = |bn: &BatchNorm, fused: bool, variant: usize| {
            use burn::tensor::activation::relu;
            let x = x.clone().detach().require_grad();
            let r = residual.clone().detach().require_grad();
            let y = match (fused, variant) {
                (true, 0) => forward(bn, x.clone()),
                (true, 1) => forward_relu(bn, x.clone()),
                (true, _) => forward_add_relu(bn, x.clone(), r.clone()),
                (false, 0) => bn.forward(x.clone()),
                (false, 1) => relu(bn.forward(x.clone())),
                (false, _) => relu(bn.forward(x.clone()) + r.clone()),
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            let values = |t: Tensor<1>| t.into_data().iter::<f32>().collect::<Vec<_>>();
            let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
            (
                flat(y),
                flat(x.grad(&grads).unwrap()),
                values(bn.gamma.grad(&grads).unwrap().reshape([6])),
                values(bn.beta.grad(&grads).unwrap().reshape([6])),
                r.grad(&grads).map(flat),
            )
        };
        assert!(takes_fused_path(&ours, &x));
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{what}[{i}]: fused {x} vs burn {y}"
                );
            }
        };
        for (variant, what) in ["norm", "norm + relu", "norm + residual + relu"]
            .iter()
            .enumerate()
        {
            let fused = run(&ours, true, variant);
            let plain = run(&theirs, false, variant);
            close(&fused.0, &plain.0, &format!("{what}: output"));
            close(&fused.1, &plain.1, &format!("{what}: input gradient"));
            close(&fused.2, &plain.2, &format!("{what}: gamma gradient"));
            close(&fused.3, &plain.3, &format!("{what}: beta gradient"));
            if variant > 0 {
                // The ReLU clamped something, and masked some gradient.
                assert!(fused.0.contains(&0.0) && fused.0.iter().any(|&v| v > 0.0));
            }
            if variant == 2 {
                let (a, b) = (fused.4.expect("residual gradient"), plain.4.unwrap());
                close(&a, &b, &format!("{what}: residual gradient"));
            }
        }

        crate::model::sync_running_stats(&ours);
        crate::model::sync_running_stats(&theirs);
        let stats = |bn: &BatchNorm| {
            [bn.running_mean.value(), bn.running_var.value()]
                .map(|t| t.into_data().iter::<f32>().collect::<Vec<_>>())
        };
        let (a, b) = (stats(&ours), stats(&theirs));
        close(&a[0], &b[0], "running mean");
        close(&a[1], &b[1], "running variance");
    }

    /// A NaN in the input comes out of the fused ReLU as NaN, as from burn's, so that the
    /// trainer's non-finite-loss guard still sees a blow-up.
    #[test]
    fn fused_relu_keeps_nan_as_burns_relu_does() {
        let device = Device::flex().autodiff();
        let mut values = vec![0.5f32; 2 * 3 * 4];
        values[5] = f32::NAN;
        let x =
            Tensor::<4>::from_data(burn::tensor::TensorData::new(values, [2, 3, 2, 2]), &device);
        let nans = |y: Tensor<4>| y.into_data().iter::<f32>().filter(|v| v.is_nan()).count();
        let bn = BatchNormConfig::new(3).init(&device);
        assert!(takes_fused_path(&bn, &x));
        let fused = nans(forward_relu(&bn, x.clone()));
        let theirs = nans(burn::tensor::activation::relu(bn.forward(x)));
        assert!(theirs > 0);
        assert_eq!(fused, theirs);
    }

    /// With the running statistics (inference, no autodiff) the scale and shift matches burn's
    /// inference BatchNorm, alone and with the residual add + ReLU after it.
    #[test]
    fn inference_matches_burns_batch_norm() {
        use burn::module::Module;
        let device = Device::flex().autodiff();
        device.seed(4);
        let mut bn = BatchNormConfig::new(6).init(&device);
        bn.gamma = burn::module::Param::from_tensor(Tensor::<1>::random(
            [6],
            Distribution::Uniform(0.5, 1.5),
            &device,
        ));
        bn.beta = burn::module::Param::from_tensor(Tensor::<1>::random(
            [6],
            Distribution::Uniform(-0.5, 0.5),
            &device,
        ));
        // Running statistics away from their initial 0 and 1.
        for _ in 0..3 {
            let x = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(1.5, 2.0), &device);
            let _ = bn.forward(x);
        }
        let bn = bn.valid();
        let plain = Device::flex();
        let x = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(1.5, 2.0), &plain);
        let residual = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(0.0, 1.0), &plain);
        assert!(!in_training(&bn, &x));
        let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let relu = burn::tensor::activation::relu::<4>;
        for (ours, theirs) in [
            (forward(&bn, x.clone()), bn.forward(x.clone())),
            (
                forward_add_relu(&bn, x.clone(), residual.clone()),
                relu(bn.forward(x.clone()) + residual.clone()),
            ),
        ] {
            for (p, q) in flat(ours).iter().zip(flat(theirs)) {
                assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
    }
}
