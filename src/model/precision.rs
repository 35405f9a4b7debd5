//! Mixed precision as PyTorch's autocast: inside an [`autocast`] scope, convolutions and linear
//! layers cast their input and weights to bfloat16, compute, and cast the result back to f32.
//! Everything else stays f32: the master weights and the optimizer state, BatchNorm (statistics
//! and normalisation), the loss, the EMA of the target. Gradients flow back through the casts,
//! so they arrive in f32 on the f32 weights.
//!
//! On flex with an AMX CPU (Intel Sapphire Rapids and later) the convolutions keep f32 tensors
//! and round to bf16 inside their GEMMs instead (`fused::amx`), which is where the speed is.
//! Without AMX they stay in f32 on flex ([`Precision::notice`]): a CPU without bf16 matrix
//! instructions only rounds, and with burn's bf16 convolution the step ran at a quarter of
//! the f32 step's speed.
//!
//! float16 (`--precision f16`, for GPUs: burn's wgpu has no bf16 arithmetic) casts the same
//! way; its five exponent bits need the loss scaled ([`crate::optim::loss_scale`]), which the
//! training loop does when [`Precision::scales_loss`].
//!
//! The scope is per thread (as PyTorch's), so tests running side by side do not see each
//! other's.

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, FloatDType, Tensor, module};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// Float type of the convolutions and linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16 compute with f32 weights, BatchNorm, loss and EMA.
    Bf16,
    /// float16 compute as bf16, with the loss scaled dynamically (PyTorch's AMP; for GPUs).
    F16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    fn compute_dtype(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        }
    }

    /// Whether training multiplies the loss by a [`crate::optim::loss_scale::LossScale`].
    pub fn scales_loss(self) -> bool {
        self == Precision::F16
    }

    /// An error naming the flag when `device` cannot compute in this precision; otherwise its
    /// [`notice`](Self::notice), if any, logged as a warning and returned.
    pub fn check(self, device: &Device) -> Result<Option<&'static str>> {
        match self.compute_dtype() {
            Some(dtype) if !device.supports_dtype(dtype) => {
                bail!(
                    "--precision {}: this backend has no {} tensors; use --precision f32",
                    self.name(),
                    self.name()
                )
            }
            _ => {
                let notice = self.notice(device);
                if let Some(notice) = notice {
                    tracing::warn!("{notice}");
                }
                Ok(notice)
            }
        }
    }

    /// Where this precision runs otherwise on `device` than the flag says, a line for the
    /// user: bf16 on flex without AMX keeps our convolutions in f32 (with our operations
    /// switched off, burn's bf16 ones run as the flag says).
    pub fn notice(self, device: &Device) -> Option<&'static str> {
        #[cfg(feature = "flex")]
        if self == Precision::Bf16
            && crate::model::fused::enabled()
            && crate::model::fused::is_flex(device)
            && !crate::model::fused::amx::available()
        {
            return Some(
                "--precision bf16: this CPU has no AMX, so the convolutions run in f32 (burn's \
                 bf16 convolution would run the step at a quarter of the f32 speed); the \
                 linear layers compute in bf16",
            );
        }
        #[cfg(not(feature = "flex"))]
        let _ = device;
        None
    }
}

thread_local! {
    static COMPUTE: Cell<Option<FloatDType>> = const { Cell::new(None) };
}

/// Restores the enclosing precision when dropped.
#[must_use = "the precision holds only while the guard lives"]
pub struct AutocastGuard {
    previous: Option<FloatDType>,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        COMPUTE.with(|c| c.set(self.previous));
    }
}

/// Computes convolutions and linear layers of this thread in `precision` until the guard drops.
pub fn autocast(precision: Precision) -> AutocastGuard {
    let previous = COMPUTE.with(|c| c.replace(precision.compute_dtype()));
    AutocastGuard { previous }
}

/// The low-precision float type of the current scope, if any.
pub(crate) fn compute_dtype() -> Option<FloatDType> {
    COMPUTE.with(|c| c.get())
}

/// The options of a bias-free or biased convolution with explicit padding; `None` for padding
/// burn computes from the input (`Same`, `Valid`), which ResNet does not use.
pub(crate) fn conv_options(conv: &Conv2d) -> Option<ConvOptions<2>> {
    let burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) = conv.padding else {
        return None;
    };
    Some(ConvOptions::new_with_padding(
        conv.stride,
        [(top, bottom), (left, right)],
        conv.dilation,
        conv.groups,
    ))
}

/// `conv` in the current scope's precision, on burn's own convolution.
pub(crate) fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match (compute_dtype(), conv_options(conv)) {
        (Some(dtype), Some(options)) => conv2d_in(conv, x, options, dtype),
        _ => conv.forward(x),
    }
}

/// `conv` (with its [`conv_options`]) in `dtype`, the result back in f32.
pub(crate) fn conv2d_in(
    conv: &Conv2d,
    x: Tensor<4>,
    options: ConvOptions<2>,
    dtype: FloatDType,
) -> Tensor<4> {
    let output = module::conv2d(
        x.cast(dtype),
        conv.weight.val().cast(dtype),
        conv.bias.as_ref().map(|b| b.val().cast(dtype)),
        options,
    );
    output.cast(FloatDType::F32)
}

/// A linear layer in the current scope's precision.
pub(crate) fn linear(layer: &Linear, x: Tensor<2>) -> Tensor<2> {
    let Some(dtype) = compute_dtype() else {
        return layer.forward(x);
    };
    // burn's Linear stores its weight as [in, out], the layout `module::linear` takes.
    module::linear(
        x.cast(dtype),
        layer.weight.val().cast(dtype),
        layer.bias.as_ref().map(|b| b.val().cast(dtype)),
    )
    .cast(FloatDType::F32)
}

/// Whether every float parameter of `module` is f32 (the master weights mixed precision keeps).
pub fn parameters_are_f32(module: &impl Module) -> bool {
    struct AllF32(bool);
    impl burn::module::ModuleVisitor for AllF32 {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            self.0 &= param.val().dtype() == DType::F32;
        }
    }
    let mut visitor = AllF32(true);
    module.visit(&mut visitor);
    visitor.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    /// The user is told exactly when bf16 convolutions run in f32: on flex without AMX.
    #[cfg(feature = "flex")]
    #[test]
    fn bf16_on_flex_without_amx_says_its_convolutions_run_in_f32() {
        let device = Device::flex().autodiff();
        let amx = crate::model::fused::amx::available();
        let notice = Precision::Bf16.notice(&device);
        assert_eq!(notice.is_some(), !amx);
        assert!(notice.is_none_or(|n| n.contains("f32") && n.contains("AMX")));
        assert_eq!(Precision::F32.notice(&device), None);
        assert_eq!(Precision::F16.notice(&device), None);
    }

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(compute_dtype(), None);
        {
            let _outer = autocast(Precision::Bf16);
            assert_eq!(compute_dtype(), Some(FloatDType::BF16));
            {
                let _inner = autocast(Precision::F32);
                assert_eq!(compute_dtype(), None);
            }
            assert_eq!(compute_dtype(), Some(FloatDType::BF16));
        }
        assert_eq!(compute_dtype(), None);
    }

    /// bf16 keeps 8 bits of mantissa: products of bf16-rounded values summed in f32 land within
    /// a few parts in a thousand of the f32 result, and the gradients reach the f32 weights.
    #[test]
    fn bf16_linear_and_conv_match_f32_within_bf16_rounding_and_keep_f32_gradients() {
        let device = Device::default().autodiff();
        let layer = LinearConfig::new(64, 32).init(&device);
        let conv = Conv2dConfig::new([8, 16], [3, 3])
            .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = Tensor::<2>::random([16, 64], Distribution::Normal(0.0, 1.0), &device);
        let images = Tensor::<4>::random([2, 8, 6, 6], Distribution::Normal(0.0, 1.0), &device);

        let exact = (layer.forward(x.clone()), conv.forward(images.clone()));
        let (low_linear, low_conv) = {
            let _bf16 = autocast(Precision::Bf16);
            let options = conv_options(&conv).unwrap();
            assert_eq!(options.padding_begin(), [1, 1]);
            (
                linear(&layer, x),
                conv2d_in(&conv, images, options, FloatDType::BF16),
            )
        };
        for (low, exact) in [
            (low_linear.clone().flatten::<1>(0, 1), exact.0.flatten(0, 1)),
            (low_conv.clone().flatten::<1>(0, 3), exact.1.flatten(0, 3)),
        ] {
            assert_eq!(low.dtype(), DType::F32);
            let scale = exact.clone().abs().max().into_scalar::<f32>();
            let error = (low - exact).abs().max().into_scalar::<f32>();
            assert!(error > 0.0, "bf16 must round something");
            assert!(error < 2e-2 * scale, "error {error} vs scale {scale}");
        }

        let grads = (low_linear.sum() + low_conv.sum()).backward();
        let weight_grad = layer.weight.grad(&grads).expect("linear weight gradient");
        assert_eq!(weight_grad.dtype(), DType::F32);
        assert!(conv.weight.grad(&grads).is_some(), "conv weight gradient");
        assert!(parameters_are_f32(&layer) && parameters_are_f32(&conv));
    }
}
