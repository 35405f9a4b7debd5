//! Dynamic loss scaling for fp16 mixed precision, with PyTorch's `GradScaler` rules: the loss
//! is multiplied by `scale` before the backward pass, so that the gradients that pass through
//! fp16 convolutions and linear layers keep their small values (below 6e-5 fp16 loses digits,
//! below 6e-8 they are zero); the gradients are divided by it again before the optimizer sees
//! them. A step whose gradients overflowed (inf or NaN) is skipped and the scale halved; after
//! `GROWTH_INTERVAL` good steps in a row it doubles. bf16 has f32's range and needs none of it.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// The scale and how many steps in a row it has been good for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: u32,
}

impl LossScale {
    /// PyTorch's defaults: 2^16, doubled after 2,000 good steps, halved on an overflow.
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u32 = 2000;

    pub fn new() -> Self {
        LossScale {
            scale: Self::INITIAL,
            good_steps: 0,
        }
    }

    /// The scale for the next step, after one whose gradients were `finite` (or not).
    pub fn update(&mut self, finite: bool) {
        if !finite {
            self.scale *= 0.5;
            self.good_steps = 0;
        } else if self.good_steps + 1 >= Self::GROWTH_INTERVAL {
            // Doubling an f64 near f32's limit would make the scaled loss inf; cap it there.
            self.scale = (self.scale * 2.0).min(f32::MAX as f64 / 2.0);
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
        }
    }
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new()
    }
}

/// Records in `scale` (where there is one) whether a step's gradients were `finite`, and
/// says whether to take the step: not from gradients that overflowed fp16 (PyTorch's
/// GradScaler skips the optimizer step; here the EMA too, as the online weights stay put).
pub fn take_step(scale: Option<&mut LossScale>, finite: bool) -> bool {
    if let Some(scale) = scale {
        scale.update(finite);
    }
    finite
}

/// The gradients of `loss` for `module`'s parameters and, with a `scale`, their [`unscale`]
/// check (`None` without one: nothing can overflow). With a `scale`, the loss is multiplied by
/// it before the backward pass and the gradients divided by it after; [`take_step`] then says
/// whether to take the step.
pub fn backward<M: Module>(
    loss: Tensor<1>,
    module: &M,
    scale: Option<&LossScale>,
) -> (GradientsParams, Option<Tensor<1>>) {
    match scale {
        None => (GradientsParams::from_grads(loss.backward(), module), None),
        Some(scale) => {
            let loss = loss.mul_scalar(scale.scale);
            let mut grads = GradientsParams::from_grads(loss.backward(), module);
            let check = unscale(&mut grads, module, scale.scale);
            (grads, check)
        }
    }
}

/// Divides every gradient of `module`'s parameters in `grads` by `scale`. Returns, not yet
/// read back, the sum of every gradient, which an inf or a NaN anywhere makes non-finite:
/// the caller reads it with the step's other values, so that a GPU waits once per step
/// (`None` when `grads` holds none of `module`'s parameters).
pub fn unscale(grads: &mut GradientsParams, module: &impl Module, scale: f64) -> Option<Tensor<1>> {
    struct Unscale<'a> {
        grads: &'a mut GradientsParams,
        inverse: f64,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Unscale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(grad) = self.grads.remove::<D>(param.id) else {
                return;
            };
            let grad = grad.mul_scalar(self.inverse);
            let sum = grad.clone().sum();
            self.total = Some(match self.total.take() {
                Some(total) => total + sum,
                None => sum,
            });
            self.grads.register(param.id, grad);
        }
    }
    let mut visitor = Unscale {
        grads,
        inverse: 1.0 / scale,
        total: None,
    };
    module.visit(&mut visitor);
    visitor.total
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, Distribution};

    #[test]
    fn halves_on_overflow_and_doubles_after_the_growth_interval() {
        let mut s = LossScale::new();
        s.update(false);
        assert_eq!(
            s,
            LossScale {
                scale: 32768.0,
                good_steps: 0
            }
        );
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(true);
        assert_eq!(
            s,
            LossScale {
                scale: 65536.0,
                good_steps: 0
            }
        );
        // An overflow resets the count of good steps.
        s.update(true);
        s.update(false);
        assert_eq!(
            s,
            LossScale {
                scale: 32768.0,
                good_steps: 0
            }
        );
    }

    #[test]
    fn a_step_is_taken_only_from_finite_gradients_and_recorded_in_the_scale() {
        assert!(take_step(None, true));
        let mut s = LossScale::new();
        assert!(!take_step(Some(&mut s), false));
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        assert!(take_step(Some(&mut s), true));
        assert_eq!(s.good_steps, 1);
    }

    /// What an [`unscale`] check says once read back.
    fn finite(check: Option<Tensor<1>>) -> bool {
        check
            .expect("a check of the gradients")
            .into_scalar::<f32>()
            .is_finite()
    }

    fn linear_grads(scale: f64, poison: bool) -> (Linear, GradientsParams, Tensor<2>) {
        let device = Device::default().autodiff();
        let layer = LinearConfig::new(4, 3).init(&device);
        let x = Tensor::<2>::random([5, 4], Distribution::Normal(0.0, 1.0), &device);
        let x = if poison { x.div_scalar(0.0) } else { x };
        let loss = layer.forward(x).sum();
        let grads = GradientsParams::from_grads(loss.mul_scalar(scale).backward(), &layer);
        let weight_grad = grads.get::<2>(layer.weight.id).expect("weight gradient");
        (layer, grads, weight_grad)
    }

    #[test]
    fn scaled_backward_gives_the_unscaled_gradients() {
        let device = Device::default().autodiff();
        let layer = LinearConfig::new(4, 3).init(&device);
        let x = Tensor::<2>::random([5, 4], Distribution::Normal(0.0, 1.0), &device);
        let loss = || layer.forward(x.clone()).powi_scalar(2).mean().unsqueeze();
        let (plain, check) = backward(loss(), &layer, None);
        assert!(check.is_none());
        let scale = LossScale::new();
        let (scaled, check) = backward(loss(), &layer, Some(&scale));
        assert!(finite(check));
        let [plain, scaled] = [plain, scaled].map(|g| g.get::<2>(layer.weight.id).unwrap());
        let error = (plain.clone() - scaled).abs().max().into_scalar::<f32>();
        assert!(error <= 1e-6 * plain.abs().max().into_scalar::<f32>());
    }

    #[test]
    fn unscale_divides_every_gradient_and_reports_overflow() {
        let (layer, mut grads, scaled) = linear_grads(1024.0, false);
        assert!(finite(unscale(&mut grads, &layer, 1024.0)));
        let unscaled = grads.get::<2>(layer.weight.id).unwrap();
        let error = (unscaled * 1024.0 - scaled.clone())
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(error <= 1e-6 * scaled.abs().max().into_scalar::<f32>());
        assert!(grads.get::<1>(layer.bias.as_ref().unwrap().id).is_some());

        let (layer, mut grads, _) = linear_grads(1024.0, true);
        assert!(!finite(unscale(&mut grads, &layer, 1024.0)));
    }
}
