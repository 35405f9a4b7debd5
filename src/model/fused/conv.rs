//! Bias-free 2-D convolution whose input gradient runs as a convolution on flex.
//!
//! burn 0.22's default backward computes a convolution's input gradient with `conv_transpose2d`,
//! which flex runs as a direct loop; PyTorch runs it through GEMM. For the stride-1 convolutions
//! that make up most of a ResNet, the input gradient *is* a convolution: of the output gradient
//! with the kernel flipped in space and with its in/out channels swapped, padded by
//! `k - 1 - p`. That convolution takes flex's im2col + GEMM path, the one that makes its
//! inference as fast as PyTorch's. Strided convolutions, and the weight gradient, keep burn's
//! backward. burn's `Conv2d` module keeps the parameters; [`forward`] replaces its forward.

use burn::backend::backend_extension;
use burn::backend::ops::ConvOptions;
use burn::backend::tensor::FloatTensor;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

#[backend_extension(Flex, Autodiff)]
pub trait GemmConvOps: burn::backend::Backend {
    /// `conv2d(x, weight)` without bias.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// The weight gradient of [`gemm_conv2d`](GemmConvOps::gemm_conv2d) (no groups, no
    /// dilation, symmetric padding): `dy` as `[C_out, N*P]` times `im2col(x)` as
    /// `[N*P, C_in*kh*kw]`, one GEMM per chunk of samples.
    fn gemm_conv2d_weight_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        kernel: [usize; 2],
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;
}

/// `conv` applied to an NCHW batch: through [`GemmConvOps`] when training on flex without a
/// bias, burn's `Conv2d::forward` otherwise.
pub fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let PaddingConfig2d::Explicit(top, left, bottom, right) = conv.padding else {
        return conv.forward(x);
    };
    if !takes_gemm_path(conv, &x) {
        return conv.forward(x);
    }
    let options = ConvOptions::new_with_padding(
        conv.stride,
        [(top, bottom), (left, right)],
        conv.dilation,
        conv.groups,
    );
    Tensor::from_dispatch(<burn::backend::Dispatch as GemmConvOps>::gemm_conv2d(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        options,
    ))
}

fn takes_gemm_path(conv: &Conv2d, x: &Tensor<4>) -> bool {
    let device = x.device();
    super::enabled()
        && conv.bias.is_none()
        && device.is_autodiff()
        && x.dtype() == burn::tensor::DType::F32
        && super::is_flex(&device)
}

/// Whether [`GemmConvOps::gemm_conv2d_weight_grad`] handles these options.
fn weight_grad_on_gemm(options: &ConvOptions<2>) -> bool {
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

mod flex {
    use super::super::{contiguous_f32, tensor};
    use super::GemmConvOps;
    use burn::backend::Flex;
    use burn::backend::ops::{ConvOptions, FloatTensorOps, ModuleOps};
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::Shape;
    use rayon::prelude::*;

    /// Floats per im2col chunk (32 MB): bounds the extra memory of a weight gradient. The tests
    /// use a tiny one, so that their small batches run in several chunks.
    #[cfg(not(test))]
    const CHUNK_FLOATS: usize = 8 << 20;
    #[cfg(test)]
    const CHUNK_FLOATS: usize = 1000;

    impl GemmConvOps for Flex {
        fn gemm_conv2d(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            <Flex as ModuleOps<Flex>>::conv2d(x, weight, None, options)
        }

        fn gemm_conv2d_weight_grad(
            x: FloatTensor<Self>,
            output_grad: FloatTensor<Self>,
            [kh, kw]: [usize; 2],
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            let x_shape = x.layout().shape().clone();
            let dy_shape = output_grad.layout().shape().clone();
            let (n, cin, h, w) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
            let (cout, ho, wo) = (dy_shape[1], dy_shape[2], dy_shape[3]);
            let (positions, taps) = (ho * wo, cin * kh * kw);
            let [sh, sw] = options.stride;
            let [ph, pw] = options.padding_begin();
            let xs = contiguous_f32(&x);
            let dys = contiguous_f32(&output_grad);
            let per_chunk = (CHUNK_FLOATS / (positions * taps).max(1)).clamp(1, n);
            let mut total: Option<FloatTensor<Flex>> = None;
            for first in (0..n).step_by(per_chunk) {
                let samples = per_chunk.min(n - first);
                // im2col: one row per output position of each sample, one column per tap.
                let mut columns = vec![0f32; samples * positions * taps];
                columns
                    .par_chunks_mut(positions * taps)
                    .enumerate()
                    .for_each(|(s, rows)| {
                        let image = &xs[(first + s) * cin * h * w..][..cin * h * w];
                        for (p, row) in rows.chunks_mut(taps).enumerate() {
                            let (oy, ox) = (p / wo, p % wo);
                            for c in 0..cin {
                                let plane = &image[c * h * w..][..h * w];
                                for i in 0..kh {
                                    let Some(y) = (oy * sh + i).checked_sub(ph).filter(|&y| y < h)
                                    else {
                                        continue;
                                    };
                                    for j in 0..kw {
                                        if let Some(xx) =
                                            (ox * sw + j).checked_sub(pw).filter(|&xx| xx < w)
                                        {
                                            row[(c * kh + i) * kw + j] = plane[y * w + xx];
                                        }
                                    }
                                }
                            }
                        }
                    });
                // dy of these samples as [C_out, samples * P].
                let mut grads = vec![0f32; cout * samples * positions];
                grads
                    .par_chunks_mut(samples * positions)
                    .enumerate()
                    .for_each(|(co, out)| {
                        for s in 0..samples {
                            let at = ((first + s) * cout + co) * positions;
                            out[s * positions..][..positions]
                                .copy_from_slice(&dys[at..at + positions]);
                        }
                    });
                let product = <Flex as FloatTensorOps<Flex>>::float_matmul(
                    tensor(grads, Shape::new([cout, samples * positions])),
                    tensor(columns, Shape::new([samples * positions, taps])),
                );
                total = Some(match total {
                    None => product,
                    Some(sum) => <Flex as FloatTensorOps<Flex>>::float_add(sum, product),
                });
            }
            let total = total.expect("at least one sample");
            <Flex as FloatTensorOps<Flex>>::float_reshape(total, Shape::new([cout, cin, kh, kw]))
        }
    }
}

mod autodiff {
    use super::{GemmConvOps, input_grad_is_a_convolution, weight_grad_on_gemm};
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
        type State = (FloatTensor<B>, FloatTensor<B>, ConvOptions<2>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_weight] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let (x, weight, options) = ops.state;
            if let Some(node) = node_weight {
                let weight_grad = if weight_grad_on_gemm(&options) {
                    let shape = weight.shape();
                    B::gemm_conv2d_weight_grad(
                        x.clone(),
                        grad.clone(),
                        [shape[2], shape[3]],
                        options.clone(),
                    )
                } else {
                    B::conv2d_weight_backward(
                        x.clone(),
                        weight.clone(),
                        grad.clone(),
                        options.clone(),
                    )
                };
                grads.register::<B>(node.id, weight_grad);
            }
            if let Some(node) = node_x {
                let shape = weight.shape();
                let kernel = [shape[2], shape[3]];
                let x_grad = if input_grad_is_a_convolution(&options, kernel) {
                    // The kernel flipped in space, in/out channels swapped, padded k - 1 - p.
                    let flipped = B::float_swap_dims(B::float_flip(weight, &[2, 3]), 0, 1);
                    let padding = [
                        kernel[0] - 1 - options.padding_begin()[0],
                        kernel[1] - 1 - options.padding_begin()[1],
                    ];
                    B::gemm_conv2d(grad, flipped, ConvOptions::new([1, 1], padding, [1, 1], 1))
                } else {
                    B::conv2d_x_backward(x, weight, grad, options)
                };
                grads.register::<B>(node.id, x_grad);
            }
        }
    }

    impl<B: Backend + GemmConvOps, C: CheckpointStrategy> GemmConvOps for Autodiff<B, C> {
        fn gemm_conv2d(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            let nodes = [x.node(), weight.node()];
            let (x, weight) = (x.into_primitive(), weight.into_primitive());
            let output = B::gemm_conv2d(x.clone(), weight.clone(), options.clone());
            match GemmConv2d.prepare::<C>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((x, weight, options), output),
                OpsKind::UnTracked(prep) => prep.finish(output),
            }
        }

        /// Not differentiated again: computed on the inner backend, outside the graph.
        fn gemm_conv2d_weight_grad(
            x: FloatTensor<Self>,
            output_grad: FloatTensor<Self>,
            kernel: [usize; 2],
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            Self::from_inner(B::gemm_conv2d_weight_grad(
                Self::inner(x),
                Self::inner(output_grad),
                kernel,
                options,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    /// Output and gradients (input and weight) against burn's own `Conv2d`, for the stride-1
    /// case that takes the convolution path and a strided one that keeps burn's backward.
    #[test]
    fn matches_burns_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(5);
        for (kernel, stride, pad) in [(3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0)] {
            let conv = Conv2dConfig::new([4, 6], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(false)
                .init(&device);
            let x = Tensor::<4>::random([3, 4, 9, 9], Distribution::Normal(0.0, 1.0), &device);
            assert!(takes_gemm_path(&conv, &x));
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
}
