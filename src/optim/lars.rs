//! LARS (You et al. 2017), as the BYOL paper and solo-learn use it.
//!
//! Per parameter tensor: `d = g + wd * w`, scaled by the trust ratio
//! `eta * ||w|| / (||g|| + wd * ||w|| + eps)` (1 where either norm is 0), optionally clipped to
//! `min(ratio / lr, 1)`; then SGD with momentum (PyTorch semantics, no dampening):
//! `buf = momentum * buf + d`, `w = w - lr * buf`. Biases and BatchNorm parameters (the rank-1
//! tensors) get neither weight decay nor the trust ratio, as in the paper and solo-learn's
//! `exclude_bias_n_norm`.

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
        let update = self.scaled_gradient(lr, &tensor, grad);
        let buffer = match state {
            Some(state) => state.momentum.mul_scalar(self.momentum) + update,
            None => update,
        };
        let tensor = tensor - buffer.clone().mul_scalar(lr);
        (tensor, Some(LarsState { momentum: buffer }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        LarsState {
            momentum: state.momentum.to_device(device),
        }
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
}
