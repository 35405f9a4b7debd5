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

pub(super) mod flex;

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
mod tests;
