//! A convolution and a BatchNorm + ReLU in training as one operation that keeps less for the
//! backward, and computes the rest again there.
//!
//! - `conv(relu(bn(x)))`: inside a residual block the first norm's output feeds only the second
//!   convolution. Kept apart, the norm keeps it for its ReLU mask and the convolution for its
//!   weight gradient: a fifth of the activations a ResNet-18 step holds for its backward. Here
//!   the norm is applied as the convolution copies its input into its zero-padded buffer (so
//!   its output is never written out), the backward keeps the norm's input and statistics,
//!   the weight gradient normalises the input again the same way, and the norm's backward takes
//!   its ReLU mask from the input ([`ChannelNorm`]: one formula, so all agree to the bit).
//! - `relu(bn(conv(x)))` for the stem: its convolution reads three channels, so running it
//!   again in the backward costs a fraction of a percent of the step, and its output (as large
//!   as the norm's) need not be kept. Its passes are the fused operations of
//!   [`super::conv`] and [`super::batch_norm`] in a row.

use burn::backend::backend_extension;
use burn::backend::ops::ConvOptions;
use burn::backend::tensor::FloatTensor;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use super::batch_norm::flex::{self as bn_flex, ChannelNorm};
use super::batch_norm::{self, FusedBatchNormOps};
use super::contiguous_f32;
use super::conv::flex::{self as conv_flex, Output};
use super::conv::{self, GemmConvOps};

#[backend_extension(Flex, Autodiff)]
pub trait NormReluConvOps: burn::backend::Backend {
    /// `(conv(relu(bn(x)), weight), mean, biased variance)` with the batch statistics of `x`;
    /// the convolution as [`GemmConvOps::gemm_conv2d`] computes it.
    #[allow(clippy::too_many_arguments)]
    fn norm_relu_conv_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `(input, gamma, beta, weight)` gradients of
    /// [`norm_relu_conv_train`](NormReluConvOps::norm_relu_conv_train) given its output's.
    #[allow(clippy::too_many_arguments)]
    fn norm_relu_conv_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
        output_grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    /// `(relu(bn(conv(x, weight))), mean, biased variance)` with the batch statistics of the
    /// convolution's output.
    #[allow(clippy::too_many_arguments)]
    fn conv_norm_relu_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `conv(relu(bn(x)))`: one operation where both would take their fused paths (training on
/// flex), the two in a row otherwise. `bn`'s running statistics are updated either way.
pub fn norm_relu_conv(bn: &BatchNorm, x: Tensor<4>, conv: &Conv2d) -> Tensor<4> {
    let apart = |x| conv::forward(conv, batch_norm::forward_relu(bn, x));
    one_operation(
        bn,
        conv,
        x,
        apart,
        |[x, gamma, beta, weight], epsilon, options, bf16| {
            Dispatch::norm_relu_conv_train(x, gamma, beta, weight, epsilon, options, bf16)
        },
    )
}

/// `relu(bn(conv(x)))`, for a convolution on few channels whose input is kept anyway: one
/// operation where both would take their fused paths, the two in a row otherwise.
pub fn conv_norm_relu(conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let apart = |x| batch_norm::forward_relu(bn, conv::forward(conv, x));
    one_operation(
        bn,
        conv,
        x,
        apart,
        |[x, gamma, beta, weight], epsilon, options, bf16| {
            Dispatch::conv_norm_relu_train(x, weight, gamma, beta, epsilon, options, bf16)
        },
    )
}

type Dispatch = burn::backend::Dispatch;

/// `fused` on `[x, gamma, beta, weight]` where both layers take their fused paths, its batch
/// statistics recorded in `bn`; `apart` on `x` otherwise.
fn one_operation(
    bn: &BatchNorm,
    conv: &Conv2d,
    x: Tensor<4>,
    apart: impl FnOnce(Tensor<4>) -> Tensor<4>,
    fused: impl FnOnce(
        [FloatTensor<Dispatch>; 4],
        f64,
        ConvOptions<2>,
        bool,
    ) -> (
        FloatTensor<Dispatch>,
        FloatTensor<Dispatch>,
        FloatTensor<Dispatch>,
    ),
) -> Tensor<4> {
    let gemm = conv::gemm_path(conv, &x);
    let Some((options, bf16)) = gemm.filter(|_| batch_norm::takes_fused_path(bn, &x)) else {
        return apart(x);
    };
    conv::record(conv, &x, &options, bf16);
    let device = x.device();
    let tensors = [
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        conv.weight.val().into_dispatch(),
    ];
    let (output, mean, variance) = fused(tensors, bn.epsilon, options, bf16);
    batch_norm::record_batch_statistics(bn, mean, variance, &device);
    Tensor::from_dispatch(output)
}

impl NormReluConvOps for burn::backend::Flex {
    /// The statistics, then the convolution normalising its input as it copies it for its
    /// im2col: the norm's output is never written out.
    fn norm_relu_conv_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (norm, mean, variance) = {
            let xs = contiguous_f32(&x);
            bn_flex::batch_norm_of(&x, &xs, [&gamma, &beta], epsilon, true)
        };
        let output = conv_flex::convolve(x, weight, options, bf16, Some(&norm), Output::Normalised);
        (output, mean, variance)
    }

    /// The weight gradient normalises the input as the forward did; the norm's backward
    /// computes its ReLU mask from the input.
    fn norm_relu_conv_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
        output_grad: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let norm = ChannelNorm::of([&mean, &variance, &gamma, &beta], epsilon, true);
        let shape = x.layout().shape().clone();
        let kernel = [weight.layout().shape()[2], weight.layout().shape()[3]];
        let weight_grad = if conv::on_gemm(&options) {
            conv_flex::weight_grad(
                x.clone(),
                output_grad.clone(),
                kernel,
                &options,
                bf16,
                Some(&norm),
            )
        } else {
            let normed = norm.apply_to(&x);
            conv::autodiff::weight_gradient::<Self>(
                normed,
                &weight,
                output_grad.clone(),
                &options,
                bf16,
            )
        };
        // The input gradient reads `x` for its shape only.
        let normed_grad =
            conv::autodiff::input_gradient::<Self>(x.clone(), weight, output_grad, options, bf16);
        let xs = contiguous_f32(&x);
        let relu = bn_flex::Relu::Input(&norm);
        let (x_grad, gamma_grad, beta_grad) = bn_flex::backward(
            &xs,
            shape,
            gamma,
            mean,
            variance,
            epsilon,
            normed_grad,
            relu,
        );
        (x_grad, gamma_grad, beta_grad, weight_grad)
    }

    /// The convolution's output lives only until the norm has read it.
    fn conv_norm_relu_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let convolved = Self::gemm_conv2d(x, weight, options, bf16);
        Self::fused_batch_norm_train(convolved, gamma, beta, epsilon, true)
    }
}

mod autodiff {
    use super::NormReluConvOps;
    use crate::model::fused::batch_norm::FusedBatchNormOps;
    use crate::model::fused::conv::GemmConvOps;
    use crate::model::fused::conv::autodiff::{input_gradient, weight_gradient};
    use burn::backend::ops::ConvOptions;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{AutodiffBackend, Backend};
    use burn_autodiff::Autodiff;
    use burn_autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
    use burn_autodiff::grads::Gradients;
    use burn_autodiff::ops::{Backward, Ops, OpsKind};

    #[derive(Debug)]
    struct NormReluConvTrain;

    /// What its backward keeps: the norm's input, not its output.
    #[derive(Clone, Debug)]
    struct NormFirst<B: Backend> {
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        beta: FloatTensor<B>,
        mean: FloatTensor<B>,
        variance: FloatTensor<B>,
        weight: FloatTensor<B>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
    }

    impl<B: Backend + NormReluConvOps> Backward<B, 4> for NormReluConvTrain {
        type State = NormFirst<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 4>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_gamma, node_beta, node_weight] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let NormFirst {
                x,
                gamma,
                beta,
                mean,
                variance,
                weight,
                epsilon,
                options,
                bf16,
            } = ops.state;
            let (x_grad, gamma_grad, beta_grad, weight_grad) = B::norm_relu_conv_train_backward(
                x, gamma, beta, mean, variance, weight, epsilon, options, bf16, grad,
            );
            for (node, value) in [
                (node_x, x_grad),
                (node_gamma, gamma_grad),
                (node_beta, beta_grad),
                (node_weight, weight_grad),
            ] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, value);
                }
            }
        }
    }

    #[derive(Debug)]
    struct ConvNormReluTrain;

    /// What its backward keeps: the convolution's input and the norm's output, not the
    /// convolution's output.
    #[derive(Clone, Debug)]
    struct ConvFirst<B: Backend> {
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        gamma: FloatTensor<B>,
        mean: FloatTensor<B>,
        variance: FloatTensor<B>,
        output: FloatTensor<B>,
        epsilon: f64,
        options: ConvOptions<2>,
        bf16: bool,
    }

    impl<B: Backend + FusedBatchNormOps + GemmConvOps> Backward<B, 4> for ConvNormReluTrain {
        type State = ConvFirst<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 4>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_weight, node_gamma, node_beta] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let ConvFirst {
                x,
                weight,
                gamma,
                mean,
                variance,
                output,
                epsilon,
                options,
                bf16,
            } = ops.state;
            let convolved = B::gemm_conv2d(x.clone(), weight.clone(), options.clone(), bf16);
            let (convolved_grad, gamma_grad, beta_grad) = B::fused_batch_norm_relu_train_backward(
                convolved, gamma, mean, variance, epsilon, grad, output,
            );
            if let Some(node) = node_weight {
                let weight_grad = weight_gradient::<B>(
                    x.clone(),
                    &weight,
                    convolved_grad.clone(),
                    &options,
                    bf16,
                );
                grads.register::<B>(node.id, weight_grad);
            }
            if let Some(node) = node_x {
                let x_grad = input_gradient::<B>(x, weight, convolved_grad, options, bf16);
                grads.register::<B>(node.id, x_grad);
            }
            for (node, value) in [(node_gamma, gamma_grad), (node_beta, beta_grad)] {
                if let Some(node) = node {
                    grads.register::<B>(node.id, value);
                }
            }
        }
    }

    impl<B, C> NormReluConvOps for Autodiff<B, C>
    where
        B: Backend + NormReluConvOps + FusedBatchNormOps + GemmConvOps,
        C: CheckpointStrategy,
    {
        fn norm_relu_conv_train(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            epsilon: f64,
            options: ConvOptions<2>,
            bf16: bool,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let nodes = [x.node(), gamma.node(), beta.node(), weight.node()];
            let (x, gamma, beta, weight) = (
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                weight.into_primitive(),
            );
            let (output, mean, variance) = B::norm_relu_conv_train(
                x.clone(),
                gamma.clone(),
                beta.clone(),
                weight.clone(),
                epsilon,
                options.clone(),
                bf16,
            );
            let output = match NormReluConvTrain
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = NormFirst {
                        x,
                        gamma,
                        beta,
                        mean: mean.clone(),
                        variance: variance.clone(),
                        weight,
                        epsilon,
                        options,
                        bf16,
                    };
                    prep.finish(state, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            (output, Self::from_inner(mean), Self::from_inner(variance))
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
        fn norm_relu_conv_train_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            mean: FloatTensor<Self>,
            variance: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            epsilon: f64,
            options: ConvOptions<2>,
            bf16: bool,
            output_grad: FloatTensor<Self>,
        ) -> (
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
            FloatTensor<Self>,
        ) {
            let (x_grad, gamma_grad, beta_grad, weight_grad) = B::norm_relu_conv_train_backward(
                Self::inner(x),
                Self::inner(gamma),
                Self::inner(beta),
                Self::inner(mean),
                Self::inner(variance),
                Self::inner(weight),
                epsilon,
                options,
                bf16,
                Self::inner(output_grad),
            );
            (
                Self::from_inner(x_grad),
                Self::from_inner(gamma_grad),
                Self::from_inner(beta_grad),
                Self::from_inner(weight_grad),
            )
        }

        fn conv_norm_relu_train(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
            options: ConvOptions<2>,
            bf16: bool,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let nodes = [x.node(), weight.node(), gamma.node(), beta.node()];
            let (x, weight, gamma, beta) = (
                x.into_primitive(),
                weight.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
            );
            let (output, mean, variance) = B::conv_norm_relu_train(
                x.clone(),
                weight.clone(),
                gamma.clone(),
                beta,
                epsilon,
                options.clone(),
                bf16,
            );
            let output = match ConvNormReluTrain
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = ConvFirst {
                        x,
                        weight,
                        gamma,
                        mean: mean.clone(),
                        variance: variance.clone(),
                        output: output.clone(),
                        epsilon,
                        options,
                        bf16,
                    };
                    prep.finish(state, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            (output, Self::from_inner(mean), Self::from_inner(variance))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::precision::{Precision, autocast};
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution};

    /// Which of the two operations.
    #[derive(Clone, Copy, Debug)]
    enum Pair {
        NormReluConv,
        ConvNormRelu,
    }

    /// Output, the gradients of input, weight, gamma and beta, and the running statistics,
    /// of `pair` fused and of its two fused operations in a row (each tested against burn's),
    /// in f32 and under a bf16 autocast (on AMX where the CPU has it, the f32 path otherwise):
    /// the same values, up to the order of float sums.
    #[test]
    fn matches_the_two_operations_in_a_row() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let precisions = [Precision::F32, Precision::Bf16];
        // A 3x3 stride-1 convolution (its input gradient a convolution), a strided one
        // (col2im), a 1x1 one (an unpadded input, normalised all the same) and a strided 1x1
        // one (of a subsample of its input), and a stem on
        // three channels; at an even size, the stride-1 ones take Winograd (in bf16, at 32
        // channels and 16 wide, the AMX convolution of planes of channel pairs; at 96, the AMX
        // weight gradient from flat positions); 16 output columns at 8 to 16 channels, on
        // AVX-512, the direct kernels (at stride 1 and 2); 1x1 ones of 64 and 16 positions there,
        // the pointwise kernel on the normalised input.
        for (pair, cin, cout, kernel, stride, size) in [
            (Pair::NormReluConv, 6, 8, 3, 1, 7),
            (Pair::NormReluConv, 8, 16, 3, 1, 16),
            (Pair::NormReluConv, 8, 16, 3, 2, 32),
            (Pair::NormReluConv, 32, 32, 3, 1, 16),
            (Pair::NormReluConv, 96, 96, 3, 1, 8),
            (Pair::NormReluConv, 6, 8, 3, 1, 8),
            (Pair::NormReluConv, 6, 8, 3, 2, 7),
            (Pair::NormReluConv, 6, 8, 1, 1, 7),
            (Pair::NormReluConv, 6, 8, 1, 2, 7),
            (Pair::NormReluConv, 6, 8, 1, 1, 8),
            (Pair::NormReluConv, 6, 8, 1, 2, 8),
            (Pair::ConvNormRelu, 3, 6, 3, 1, 7),
            (Pair::ConvNormRelu, 3, 6, 3, 1, 8),
        ] {
            let pad = kernel / 2;
            let conv = conv::test_conv([cin, cout], kernel, stride, pad, &device);
            let channels = match pair {
                Pair::NormReluConv => cin,
                Pair::ConvNormRelu => cout,
            };
            let gamma = Tensor::<1>::random([channels], Distribution::Uniform(0.5, 1.5), &device);
            let beta = Tensor::<1>::random([channels], Distribution::Uniform(-0.5, 0.5), &device);
            let x = Tensor::<4>::random(
                [4, cin, size, size],
                Distribution::Normal(0.5, 1.5),
                &device,
            );
            let side = (size + 2 * pad - kernel) / stride + 1;
            let weights =
                Tensor::<4>::random([4, cout, side, side], Distribution::Default, &device);
            for &precision in &precisions {
                let run = |fused: bool| {
                    // A layer of its own per run: running statistics are shared between clones.
                    let mut bn = BatchNormConfig::new(channels).init(&device);
                    bn.gamma = burn::module::Param::from_tensor(gamma.clone().detach());
                    bn.beta = burn::module::Param::from_tensor(beta.clone().detach());
                    let x = x.clone().detach().require_grad();
                    let y = {
                        let _scope = autocast(precision);
                        assert!(conv::gemm_path(&conv, &x).is_some());
                        assert!(batch_norm::takes_fused_path(&bn, &x));
                        match (pair, fused) {
                            (Pair::NormReluConv, true) => norm_relu_conv(&bn, x.clone(), &conv),
                            (Pair::NormReluConv, false) => {
                                conv::forward(&conv, batch_norm::forward_relu(&bn, x.clone()))
                            }
                            (Pair::ConvNormRelu, true) => conv_norm_relu(&conv, &bn, x.clone()),
                            (Pair::ConvNormRelu, false) => {
                                batch_norm::forward_relu(&bn, conv::forward(&conv, x.clone()))
                            }
                        }
                    };
                    let grads = (y.clone() * weights.clone()).sum().backward();
                    crate::model::sync_running_stats(&bn);
                    let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
                    let values = |t: Tensor<1>| t.into_data().iter::<f32>().collect::<Vec<_>>();
                    vec![
                        ("output", flat(y)),
                        ("input gradient", flat(x.grad(&grads).unwrap())),
                        ("weight gradient", flat(conv.weight.grad(&grads).unwrap())),
                        ("gamma gradient", values(bn.gamma.grad(&grads).unwrap())),
                        ("beta gradient", values(bn.beta.grad(&grads).unwrap())),
                        ("running mean", values(bn.running_mean.value())),
                        ("running variance", values(bn.running_var.value())),
                    ]
                };
                let (fused, apart) = (run(true), run(false));
                for ((what, a), (_, b)) in fused.iter().zip(&apart) {
                    assert_eq!(a.len(), b.len(), "{what}");
                    assert!(a.iter().any(|&v| v != 0.0), "{pair:?} {what}: all zero");
                    for (i, (p, q)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                            "{pair:?} stride {stride} {precision:?}: {what}[{i}] {p} vs {q}"
                        );
                    }
                }
            }
        }
    }
}
