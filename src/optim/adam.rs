//! Adam (Kingma and Ba 2015) as burn's `Adam` computes it, in one parallel pass per parameter
//! on flex.
//!
//! burn's step is about fifteen element-wise ops per parameter tensor (moments, bias
//! correction, square root, division, decay, update), each on one thread ([`super::fused`]):
//! 10.6 ms of a 445 ms step at width 0.25. Here each tensor is read once and its parameter
//! and moments written once, split over the rayon pool, with burn's operations in burn's order
//! so that the values agree to the bit. The state is burn's `AdamState`, so checkpoints
//! written with either load with either. Off flex (or for other dtypes) burn's `Adam` runs,
//! and it is the reference in the tests.

#[cfg(feature = "flex")]
use burn::backend::{backend_extension, tensor::FloatTensor};
#[cfg(feature = "flex")]
use burn::optim::AdaptiveMomentumState;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{Adam as BurnAdam, AdamConfig, AdamState, LearningRate, Optimizer};
use burn::tensor::{Device, Tensor};

/// Adam with PyTorch's defaults (betas 0.9 and 0.999, epsilon 1e-8), L2 weight decay added
/// to the gradient (PyTorch's `Adam(weight_decay=...)`).
#[derive(Clone)]
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub struct Adam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: Option<f32>,
    /// The same optimizer on burn's ops, for the tensors the fused pass does not take.
    burn: BurnAdam,
}

impl Adam {
    pub fn new(weight_decay: Option<f32>) -> Self {
        let (beta_1, beta_2, epsilon) = (0.9, 0.999, 1e-8);
        let burn = AdamConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay.map(WeightDecayConfig::new))
            .build();
        Adam {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            burn,
        }
    }

    /// The scalars of step `time` (1 for the first) at rate `lr`, each computed as burn does
    /// (in f32).
    #[cfg(feature = "flex")]
    fn scalars(&self, lr: LearningRate, time: usize) -> AdamScalars {
        let time = time as i32;
        let bias_correction2_sqrt = (1.0 - self.beta_2.powi(time)).sqrt();
        AdamScalars {
            beta_1: self.beta_1,
            one_minus_beta_1: 1.0 - self.beta_1,
            beta_2: self.beta_2,
            one_minus_beta_2: 1.0 - self.beta_2,
            step_factor: bias_correction2_sqrt / (1.0 - self.beta_1.powi(time)),
            epsilon: self.epsilon * bias_correction2_sqrt,
            lr: lr as f32,
            weight_decay: self.weight_decay,
        }
    }

    /// [`Optimizer::step`] as one flex operation.
    #[cfg(feature = "flex")]
    fn fused_step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamState<D>>,
    ) -> (Tensor<D>, Option<AdamState<D>>) {
        // The first step is the general one from zero moments: `0 * beta + x` is `x` exactly.
        let (time, moment_1, moment_2) = match state {
            Some(AdamState { momentum }) => (momentum.time, momentum.moment_1, momentum.moment_2),
            None => (0, tensor.zeros_like(), tensor.zeros_like()),
        };
        let time = time + 1;
        let (tensor, moment_1, moment_2) =
            <burn::backend::Dispatch as FusedAdamOps>::fused_adam_step(
                tensor.into_dispatch(),
                grad.into_dispatch(),
                moment_1.into_dispatch(),
                moment_2.into_dispatch(),
                self.scalars(lr, time),
            );
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: Tensor::from_dispatch(moment_1),
            moment_2: Tensor::from_dispatch(moment_2),
            max_moment_2: None,
        };
        (
            Tensor::from_dispatch(tensor),
            Some(AdamState::new(momentum)),
        )
    }
}

impl Optimizer for Adam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        #[cfg(feature = "flex")]
        if super::fused::applies(&tensor, &grad) {
            return self.fused_step(lr, tensor, grad, state);
        }
        self.burn.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        BurnAdam::to_device(state, device)
    }
}

/// The per-step scalars of [`FusedAdamOps::fused_adam_step`].
#[cfg(feature = "flex")]
#[derive(Clone, Copy, Debug)]
pub struct AdamScalars {
    beta_1: f32,
    one_minus_beta_1: f32,
    beta_2: f32,
    one_minus_beta_2: f32,
    /// `sqrt(1 - beta_2^t) / (1 - beta_1^t)`.
    step_factor: f32,
    /// epsilon x `sqrt(1 - beta_2^t)`.
    epsilon: f32,
    lr: f32,
    weight_decay: Option<f32>,
}

#[cfg(feature = "flex")]
impl AdamScalars {
    /// One value's step: `(parameter, moment_1, moment_2)` after it, in burn's order of
    /// operations.
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = match self.weight_decay {
            Some(penalty) => p * penalty + g,
            None => g,
        };
        let m = m * self.beta_1 + g * self.one_minus_beta_1;
        let v = v * self.beta_2 + g * g * self.one_minus_beta_2;
        let update = m * self.step_factor / (v.sqrt() + self.epsilon);
        (p - update * self.lr, m, v)
    }
}

#[cfg(feature = "flex")]
#[backend_extension(Flex)]
pub trait FusedAdamOps: burn::backend::Backend {
    /// `(parameter, moment_1, moment_2)` after one Adam step.
    fn fused_adam_step(
        parameter: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        scalars: AdamScalars,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

#[cfg(feature = "flex")]
mod flex {
    use super::{AdamScalars, FusedAdamOps};
    use crate::model::fused::{contiguous_f32, wide};
    use crate::optim::fused::{CHUNK, contiguous, values_mut};
    use burn::backend::Flex;
    use burn::backend::tensor::FloatTensor;
    use rayon::prelude::*;

    impl FusedAdamOps for Flex {
        fn fused_adam_step(
            parameter: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
            moment_1: FloatTensor<Flex>,
            moment_2: FloatTensor<Flex>,
            scalars: AdamScalars,
        ) -> (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>) {
            let g = contiguous_f32(&grad);
            // Updated in place, so the step allocates nothing.
            let [mut parameter, mut moment_1, mut moment_2] =
                [parameter, moment_1, moment_2].map(contiguous);
            let [p, m, v] = [&mut parameter, &mut moment_1, &mut moment_2].map(values_mut);
            p.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((p, m), v), g)| {
                    // Vector square roots and divisions (exactly rounded, as the scalar ones).
                    wide(
                        #[inline(always)]
                        || {
                            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                                (*p, *m, *v) = scalars.apply(*p, g, *m, *v);
                            }
                        },
                    );
                });
            (parameter, moment_1, moment_2)
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::optim::GradientsParams;
    use burn::tensor::{Distribution, TensorData};

    fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
        t.to_data().try_to_vec::<f32>().unwrap()
    }

    /// Three steps on the same tensors, ours and burn's, agree to the bit, with and without
    /// weight decay, on a tensor that spans several parallel chunks.
    #[test]
    fn matches_burns_adam_to_the_bit() {
        let device = Device::flex();
        assert!(crate::model::fused::is_flex(&device));
        for decay in [None, Some(0.01f32)] {
            let ours = Adam::new(decay);
            let theirs = ours.burn.clone();
            let shape = [3, super::super::fused::CHUNK + 5];
            let start = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let (mut a, mut b) = (start.clone(), start);
            let (mut state_a, mut state_b) = (None, None);
            for step in 0..3 {
                let grad = Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.1), &device);
                let lr = 1e-3 * (step + 1) as f64;
                (a, state_a) = ours.step(lr, a, grad.clone(), state_a);
                (b, state_b) = theirs.step(lr, b, grad, state_b);
                assert!(super::super::fused::applies(&a, &a));
                assert_eq!(
                    values(&a),
                    values(&b),
                    "parameter, step {step}, decay {decay:?}"
                );
                let (sa, sb) = (state_a.clone().unwrap(), state_b.clone().unwrap());
                assert_eq!(sa.momentum.time, sb.momentum.time);
                assert_eq!(values(&sa.momentum.moment_1), values(&sb.momentum.moment_1));
                assert_eq!(values(&sa.momentum.moment_2), values(&sb.momentum.moment_2));
            }
        }
    }

    /// The step a user makes through a module: every parameter moves, as a hand computation
    /// of Adam's first step says (`lr * g / (|g| + eps)`, about `lr * sign(g)`).
    #[test]
    fn first_step_through_a_module_moves_by_lr_times_the_sign() {
        let device = Device::flex().autodiff();
        let linear = burn::nn::LinearConfig::new(3, 2).init(&device);
        let before = values(&linear.weight.val());
        let x = Tensor::<2>::from_data(TensorData::from([[1.0f32, -2.0, 0.5]]), &device);
        let grads = linear.forward(x).sum().backward();
        let grads = GradientsParams::from_grads(grads, &linear);
        let mut optimizer = burn::optim::ModuleOptimizer::from(Adam::new(None));
        let linear = optimizer.step(0.1, linear, grads);
        let after = values(&linear.weight.val());
        // d(sum(x W + b))/dW[i][j] = x[i]: W is [in, out].
        let signs = [1.0f32, 1.0, -1.0, -1.0, 1.0, 1.0];
        for ((b, a), s) in before.iter().zip(&after).zip(signs) {
            assert!(
                (b - a - 0.1 * s).abs() < 1e-5,
                "{b} -> {a}, gradient sign {s}"
            );
        }
    }
}
