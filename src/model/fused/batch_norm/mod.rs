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

pub(super) mod flex;

mod autodiff;

#[cfg(test)]
mod tests;
