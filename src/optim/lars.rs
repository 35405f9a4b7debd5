//! LARS (You et al. 2017), as the BYOL paper and solo-learn use it.
//!
//! Per parameter tensor: `d = g + wd * w`, scaled by the trust ratio
//! `eta * ||w|| / (||g|| + wd * ||w|| + eps)` (1 where either norm is 0), optionally clipped to
//! `min(ratio / lr, 1)`; then SGD with momentum (PyTorch semantics, no dampening):
//! `buf = momentum * buf + d`, `w = w - lr * buf`. Biases and BatchNorm parameters (the rank-1
//! tensors) get neither weight decay nor the trust ratio, as in the paper and solo-learn's
//! `exclude_bias_n_norm`.
//!
//! On flex each tensor takes two parallel passes ([`super::fused`]): its two norms, then the
//! update of the weights and the momentum buffer in place. burn's ops (about twenty per
//! tensor, each on one thread) run elsewhere and are the reference in the tests.

#[cfg(feature = "flex")]
use burn::backend::{backend_extension, tensor::FloatTensor};
use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};

#[derive(Clone, Debug)]
pub struct Lars {
    pub momentum: f64,
    pub weight_decay: f64,
    pub eta: f64,
    /// solo-learn's `clip_lr`: cap the adapted rate at the base rate.
    pub clip_lr: bool,
    /// Leave rank-1 parameters (biases, BatchNorm) out of decay and adaptation.
    pub exclude_bias_and_norm: bool,
}

const EPS: f64 = 1e-8;

/// The momentum buffer of one parameter.
#[derive(Clone)]
pub struct LarsState<const D: usize> {
    pub momentum: Tensor<D>,
}

// Written out: burn's `#[derive(RecordState)]` only works inside burn-optim.
impl<const D: usize> RecordState for LarsState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_tensor(prefix, "momentum", self.momentum.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let data = src.take_tensor(prefix, "momentum")?;
        Some(LarsState {
            momentum: Tensor::from_data(data, device),
        })
    }
}

fn norm<const D: usize>(x: &Tensor<D>) -> Tensor<1> {
    x.clone().square().sum().sqrt()
}

impl Lars {
    /// The update direction before momentum, for one tensor.
    pub fn scaled_gradient<const D: usize>(
        &self,
        lr: f64,
        weight: &Tensor<D>,
        grad: Tensor<D>,
    ) -> Tensor<D> {
        if self.exclude_bias_and_norm && D == 1 {
            return grad;
        }
        let (w_norm, g_norm) = (norm(weight), norm(&grad));
        let ratio = w_norm.clone().mul_scalar(self.eta)
            / (g_norm.clone() + w_norm.clone().mul_scalar(self.weight_decay)).add_scalar(EPS);
        let ratio = if self.clip_lr {
            ratio.div_scalar(lr).clamp_max(1.0)
        } else {
            ratio
        };
        // Where either norm is zero the rate is left alone.
        let degenerate = w_norm.equal_elem(0.0).bool_or(g_norm.equal_elem(0.0));
        let ratio = ratio.mask_fill(degenerate, 1.0);
        let shape = [1; D];
        let ratio: Tensor<D> = ratio.reshape(shape);
        (grad + weight.clone().mul_scalar(self.weight_decay)) * ratio
    }
}

impl Optimizer for Lars {
    type State<const D: usize> = LarsState<D>;

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
        self.step_on_burn_ops(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        LarsState {
            momentum: state.momentum.to_device(device),
        }
    }
}

impl Lars {
    /// [`Optimizer::step`] on burn's tensor ops, for any backend.
    fn step_on_burn_ops<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<LarsState<D>>,
    ) -> (Tensor<D>, Option<LarsState<D>>) {
        let update = self.scaled_gradient(lr, &tensor, grad);
        let buffer = match state {
            Some(state) => state.momentum.mul_scalar(self.momentum) + update,
            None => update,
        };
        let tensor = tensor - buffer.clone().mul_scalar(lr);
        (tensor, Some(LarsState { momentum: buffer }))
    }

    /// [`Optimizer::step`] as one flex operation.
    #[cfg(feature = "flex")]
    fn fused_step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<LarsState<D>>,
    ) -> (Tensor<D>, Option<LarsState<D>>) {
        // The first step is the general one from a zero buffer: `0 * momentum + d` is `d`.
        let buffer = match state {
            Some(state) => state.momentum,
            None => tensor.zeros_like(),
        };
        let step = LarsStep {
            lr,
            momentum: self.momentum as f32,
            weight_decay: self.weight_decay,
            eta: self.eta,
            clip_lr: self.clip_lr,
            adapt: !(self.exclude_bias_and_norm && D == 1),
        };
        let (tensor, buffer) = <burn::backend::Dispatch as FusedLarsOps>::fused_lars_step(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            buffer.into_dispatch(),
            step,
        );
        let momentum = Tensor::from_dispatch(buffer);
        (Tensor::from_dispatch(tensor), Some(LarsState { momentum }))
    }
}

/// One LARS step's settings for [`FusedLarsOps::fused_lars_step`].
#[cfg(feature = "flex")]
#[derive(Clone, Copy, Debug)]
pub struct LarsStep {
    lr: f64,
    momentum: f32,
    weight_decay: f64,
    eta: f64,
    clip_lr: bool,
    /// Weight decay and the trust ratio apply (not a bias or norm parameter left out).
    adapt: bool,
}

#[cfg(feature = "flex")]
impl LarsStep {
    /// The trust ratio for the weights' and the gradient's norms, as
    /// [`Lars::scaled_gradient`] computes it.
    fn ratio(&self, weight_norm: f64, grad_norm: f64) -> f64 {
        if weight_norm == 0.0 || grad_norm == 0.0 {
            return 1.0;
        }
        let ratio = self.eta * weight_norm / (grad_norm + self.weight_decay * weight_norm + EPS);
        if self.clip_lr {
            (ratio / self.lr).min(1.0)
        } else {
            ratio
        }
    }
}

#[cfg(feature = "flex")]
#[backend_extension(Flex)]
pub trait FusedLarsOps: burn::backend::Backend {
    /// `(weights, momentum buffer)` after one LARS step.
    fn fused_lars_step(
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        buffer: FloatTensor<Self>,
        step: LarsStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

#[cfg(feature = "flex")]
mod flex {
    use super::{FusedLarsOps, LarsStep};
    use crate::model::fused::{contiguous_f32, wide};
    use crate::optim::fused::{CHUNK, contiguous, values_mut};
    use burn::backend::Flex;
    use burn::backend::tensor::FloatTensor;
    use rayon::prelude::*;

    impl FusedLarsOps for Flex {
        fn fused_lars_step(
            weight: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
            buffer: FloatTensor<Flex>,
            step: LarsStep,
        ) -> (FloatTensor<Flex>, FloatTensor<Flex>) {
            let g = contiguous_f32(&grad);
            let [mut weight, mut buffer] = [weight, buffer].map(contiguous);
            let [w, b] = [&mut weight, &mut buffer].map(values_mut);
            let (ratio, decay) = if step.adapt {
                let [w_norm, g_norm] = norms(w, &g);
                (step.ratio(w_norm, g_norm) as f32, step.weight_decay as f32)
            } else {
                (1.0, 0.0)
            };
            let (momentum, lr) = (step.momentum, step.lr as f32);
            w.par_chunks_mut(CHUNK)
                .zip(b.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|((w, b), g)| {
                    let update = |w: f32, g: f32| {
                        if step.adapt {
                            (g + w * decay) * ratio
                        } else {
                            g
                        }
                    };
                    for ((w, b), &g) in w.iter_mut().zip(b).zip(g) {
                        *b = *b * momentum + update(*w, g);
                        *w -= *b * lr;
                    }
                });
            (weight, buffer)
        }
    }

    /// `[||w||, ||g||]` in one parallel pass over both, the sums of squares in f64, added
    /// chunk by chunk in order (so they do not depend on the threads).
    fn norms(w: &[f32], g: &[f32]) -> [f64; 2] {
        let squares = |values: &[f32]| {
            wide(
                #[inline(always)]
                || {
                    let mut acc = [0f64; 8];
                    for chunk in values.chunks(8) {
                        for (a, &v) in acc.iter_mut().zip(chunk) {
                            *a += (v as f64) * (v as f64);
                        }
                    }
                    acc.iter().sum::<f64>()
                },
            )
        };
        let chunks: Vec<[f64; 2]> = w
            .par_chunks(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .map(|(w, g)| [squares(w), squares(g)])
            .collect();
        let sum = |k: usize| chunks.iter().map(|c| c[k]).sum::<f64>().sqrt();
        [sum(0), sum(1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lars(clip_lr: bool) -> Lars {
        Lars {
            momentum: 0.9,
            weight_decay: 0.1,
            eta: 0.02,
            clip_lr,
            exclude_bias_and_norm: true,
        }
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn matrix_step_matches_a_hand_computation() {
        let device = Device::default();
        let w = Tensor::<2>::from_floats([[3.0, 0.0], [0.0, 4.0]], &device); // ||w|| = 5
        let g = Tensor::<2>::from_floats([[0.0, 1.0], [0.0, 0.0]], &device); // ||g|| = 1
        let lr = 0.5;
        // ratio = 0.02 * 5 / (1 + 0.1 * 5 + 1e-8) = 0.0666...; d = (g + 0.1 w) * ratio.
        let ratio = 0.02 * 5.0 / (1.0 + 0.5 + 1e-8);
        let d = [0.3 * ratio, 1.0 * ratio, 0.0, 0.4 * ratio];
        let (w1, state) = lars(false).step(lr, w.clone(), g.clone(), None);
        let want: Vec<f32> = [3.0, 0.0, 0.0, 4.0]
            .iter()
            .zip(d)
            .map(|(w, d)| (w - lr * d) as f32)
            .collect();
        assert!(
            values(w1.clone())
                .iter()
                .zip(&want)
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
        // Second step: the momentum buffer carries 0.9 of the first update.
        let (w2, _) = lars(false).step(lr, w1.clone(), g.clone(), state);
        let d2: Vec<f64> = {
            let w1v = values(w1.clone());
            let wn = w1v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let r = 0.02 * wn / (1.0 + 0.1 * wn + 1e-8);
            let gv = [0.0, 1.0, 0.0, 0.0];
            w1v.iter()
                .zip(gv)
                .map(|(w, g)| (g + 0.1 * *w as f64) * r)
                .collect()
        };
        let want2: Vec<f32> = values(w1)
            .iter()
            .zip(d.iter().zip(&d2))
            .map(|(w, (d1, d2))| (*w as f64 - lr * (0.9 * d1 + d2)) as f32)
            .collect();
        assert!(
            values(w2)
                .iter()
                .zip(&want2)
                .all(|(a, b)| (a - b).abs() < 1e-6)
        );
    }

    #[test]
    fn clipping_caps_the_ratio_at_the_base_rate() {
        let device = Device::default();
        let w = Tensor::<2>::from_floats([[100.0]], &device);
        let g = Tensor::<2>::from_floats([[0.001]], &device);
        // Unclipped ratio 0.02 * 100 / (0.001 + 10) ~ 0.2 > lr 0.01 would give ratio/lr = 20: clipped to 1.
        let d = values(lars(true).scaled_gradient(0.01, &w, g));
        assert!((d[0] - (0.001 + 10.0)).abs() < 1e-3, "{d:?}");
    }

    #[test]
    fn biases_and_norm_parameters_get_plain_momentum_sgd() {
        let device = Device::default();
        let w = Tensor::<1>::from_floats([1.0, -2.0], &device);
        let g = Tensor::<1>::from_floats([0.5, 0.25], &device);
        let (w1, _) = lars(false).step(0.1, w, g, None);
        assert_eq!(values(w1), vec![1.0 - 0.05, -2.0 - 0.025]);
    }

    #[test]
    fn zero_weights_keep_the_unit_ratio() {
        let device = Device::default();
        let w = Tensor::<2>::zeros([2, 2], &device);
        let g = Tensor::<2>::ones([2, 2], &device);
        assert_eq!(
            values(lars(false).scaled_gradient(0.1, &w, g)),
            vec![1.0; 4]
        );
    }

    #[cfg(feature = "flex")]
    /// Three steps of the fused pass against burn's ops, on tensors that span several parallel
    /// chunks: a matrix (decay and trust ratio, clipped or not) and a bias (neither).
    #[test]
    fn fused_steps_match_burns_ops() {
        use burn::tensor::Distribution;
        let device = Device::default();
        for clip_lr in [false, true] {
            let lars = lars(clip_lr);
            let shape = [3, crate::optim::fused::CHUNK + 7];
            let start = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let bias = Tensor::<1>::random([40], Distribution::Normal(0.0, 1.0), &device);
            let (mut ours, mut theirs) = ((start.clone(), None), (start, None));
            let (mut ours_b, mut theirs_b) = ((bias.clone(), None), (bias, None));
            for step in 0..3 {
                let grad = Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.1), &device);
                let grad_b = Tensor::<1>::random([40], Distribution::Normal(0.0, 0.1), &device);
                let lr = 0.5 * (step + 1) as f64;
                assert!(crate::optim::fused::applies(&grad, &grad));
                ours = lars.step(lr, ours.0, grad.clone(), ours.1);
                theirs = lars.step_on_burn_ops(lr, theirs.0, grad, theirs.1);
                ours_b = lars.step(lr, ours_b.0, grad_b.clone(), ours_b.1);
                theirs_b = lars.step_on_burn_ops(lr, theirs_b.0, grad_b, theirs_b.1);
                let pairs = [
                    (values(ours.0.clone()), values(theirs.0.clone())),
                    (
                        values(ours.1.clone().unwrap().momentum),
                        values(theirs.1.clone().unwrap().momentum),
                    ),
                ];
                for (a, b) in pairs {
                    for (x, y) in a.iter().zip(&b) {
                        assert!(
                            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                            "{x} vs {y}, step {step}"
                        );
                    }
                }
                // Without the trust ratio the operations are the same: to the bit.
                assert_eq!(values(ours_b.0.clone()), values(theirs_b.0.clone()));
            }
        }
    }
}
