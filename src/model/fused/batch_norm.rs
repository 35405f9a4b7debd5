//! BatchNorm in training mode as one fused operation on flex.
//!
//! burn 0.22's default `batch_norm_train` (which flex does not specialise) builds the batch
//! statistics from `swap_dims(0, 1)` + reshape copies and several element-wise passes, forward
//! and backward; profiling put about a tenth of the BYOL step in those copies alone. Here the
//! statistics are per-channel sums over the contiguous `H x W` runs of an NCHW tensor: forward
//! reads the input twice and writes the output once, backward reads input and gradient twice
//! and writes the input gradient once, channels split over the rayon pool. burn's `BatchNorm`
//! module keeps the parameters and running statistics; [`forward`] only replaces its training
//! forward, and burn's own op stays the reference in the tests.

use burn::backend::backend_extension;
use burn::backend::tensor::FloatTensor;
use burn::nn::BatchNorm;
use burn::tensor::Tensor;

/// The fused training-mode BatchNorm, for the backends that implement it.
#[backend_extension(Flex, Autodiff)]
pub trait FusedBatchNormOps: burn::backend::Backend {
    /// `(output, mean, biased variance)` of an NCHW input normalised with its batch statistics.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
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
}

/// `bn` applied to an NCHW batch: the fused path when training on flex in f32, burn's
/// `BatchNorm::forward` otherwise. Running statistics are updated exactly as burn does.
pub fn forward(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    if !takes_fused_path(bn, &x) {
        return bn.forward(x);
    }
    let device = x.device();
    let (output, mean, variance) =
        <burn::backend::Dispatch as FusedBatchNormOps>::fused_batch_norm_train(
            x.into_dispatch(),
            bn.gamma.val().into_dispatch(),
            bn.beta.val().into_dispatch(),
            bn.epsilon,
        );
    let mean = Tensor::<1>::from_dispatch(mean).detach();
    let variance = Tensor::<1>::from_dispatch(variance).detach();
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
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
    Tensor::from_dispatch(output)
}

/// Training mode (as burn decides it: an autodiff device and the layer's flag) on flex, f32.
fn takes_fused_path(bn: &BatchNorm, x: &Tensor<4>) -> bool {
    let device = x.device();
    super::enabled()
        && device.is_autodiff()
        && bn.training.is_enabled()
        && x.dtype() == burn::tensor::DType::F32
        && super::is_flex(&device)
}

mod flex {
    use super::super::{contiguous_f32, tensor};
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

    /// `sum(f(values[i], other[i]))` with eight accumulators.
    fn sum_zip(values: &[f32], other: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
        let mut acc = [0f32; 8];
        let (a8, b8) = (values.chunks_exact(8), other.chunks_exact(8));
        let tail: f32 = a8
            .remainder()
            .iter()
            .zip(b8.remainder())
            .map(|(&x, &y)| f(x, y))
            .sum();
        for (xs, ys) in a8.zip(b8) {
            for ((a, &x), &y) in acc.iter_mut().zip(xs).zip(ys) {
                *a += f(x, y);
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    /// Per channel (in parallel), the sum over the batch of `f(channel, offset)`, where
    /// `offset` starts that sample's run of `spatial` values in the NCHW buffer.
    fn per_channel(
        (n, c, s): (usize, usize, usize),
        f: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Vec<f64> {
        (0..c)
            .into_par_iter()
            .map(|ch| (0..n).map(|b| f(ch, (b * c + ch) * s) as f64).sum())
            .collect()
    }

    impl FusedBatchNormOps for Flex {
        fn fused_batch_norm_train(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let shape = x.layout().shape().clone();
            let (n, c, s) = dims(&shape);
            let count = (n * s) as f64;
            let xs = contiguous_f32(&x);
            let (gamma, beta) = (contiguous_f32(&gamma), contiguous_f32(&beta));
            let mean: Vec<f32> = per_channel((n, c, s), |_, at| sum_of(&xs[at..at + s], |v| v))
                .into_iter()
                .map(|total| (total / count) as f32)
                .collect();
            // Two passes (mean first): the variance without the cancellation of E[x^2] - E[x]^2.
            let variance: Vec<f32> = per_channel((n, c, s), |ch, at| {
                let m = mean[ch];
                sum_of(&xs[at..at + s], |v| (v - m) * (v - m))
            })
            .into_iter()
            .map(|total| (total / count) as f32)
            .collect();
            let scale: Vec<f32> = (0..c)
                .map(|ch| gamma[ch] / (variance[ch] as f64 + epsilon).sqrt() as f32)
                .collect();
            let mut out = vec![0f32; xs.len()];
            out.par_chunks_mut(s)
                .zip(xs.par_chunks(s))
                .enumerate()
                .for_each(|(i, (o, run))| {
                    let ch = i % c;
                    let (m, k, b) = (mean[ch], scale[ch], beta[ch]);
                    for (o, &v) in o.iter_mut().zip(run) {
                        *o = (v - m) * k + b;
                    }
                });
            (
                tensor(out, shape),
                tensor(mean, Shape::new([c])),
                tensor(variance, Shape::new([c])),
            )
        }

        fn fused_batch_norm_train_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            mean: FloatTensor<Self>,
            variance: FloatTensor<Self>,
            epsilon: f64,
            output_grad: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let shape = x.layout().shape().clone();
            let (n, c, s) = dims(&shape);
            let count = (n * s) as f32;
            let xs = contiguous_f32(&x);
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
            let sum_dy: Vec<f32> = per_channel((n, c, s), |_, at| sum_of(&dy[at..at + s], |g| g))
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let sum_dy_centred: Vec<f32> = per_channel((n, c, s), |ch, at| {
                let m = mean[ch];
                sum_zip(&xs[at..at + s], &dy[at..at + s], |v, g| (v - m) * g)
            })
            .into_iter()
            .map(|v| v as f32)
            .collect();
            // dx = gamma inv_std (dy - mean(dy) - xhat mean(dy xhat)), as a*dy - b*(x - mean) - k.
            let coefficients: Vec<(f32, f32, f32)> = (0..c)
                .map(|ch| {
                    let a = gamma[ch] * inv_std[ch];
                    let b = a * inv_std[ch] * inv_std[ch] * sum_dy_centred[ch] / count;
                    (a, b, a * sum_dy[ch] / count)
                })
                .collect();
            let mut dx = vec![0f32; xs.len()];
            dx.par_chunks_mut(s)
                .zip(xs.par_chunks(s).zip(dy.par_chunks(s)))
                .enumerate()
                .for_each(|(i, (out, (run, grads)))| {
                    let ch = i % c;
                    let (a, b, k) = coefficients[ch];
                    let m = mean[ch];
                    for ((o, &v), &g) in out.iter_mut().zip(run).zip(grads) {
                        *o = a * g - b * (v - m) - k;
                    }
                });
            let gamma_grad: Vec<f32> = (0..c).map(|ch| sum_dy_centred[ch] * inv_std[ch]).collect();
            (
                tensor(dx, shape),
                tensor(gamma_grad, Shape::new([c])),
                tensor(sum_dy, Shape::new([c])),
            )
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
        /// Input, gamma, and the batch statistics the forward computed.
        type State = (
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            f64,
        );

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_gamma, node_beta] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let (x, gamma, mean, variance, epsilon) = ops.state;
            let (x_grad, gamma_grad, beta_grad) =
                B::fused_batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad);
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

    impl<B: Backend + FusedBatchNormOps, C: CheckpointStrategy> FusedBatchNormOps for Autodiff<B, C> {
        fn fused_batch_norm_train(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let nodes = [x.node(), gamma.node(), beta.node()];
            let (x, gamma, beta) = (
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
            );
            let (output, mean, variance) =
                B::fused_batch_norm_train(x.clone(), gamma.clone(), beta, epsilon);
            let output = match FusedBatchNormTrain
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    prep.finish((x, gamma, mean.clone(), variance.clone(), epsilon), output)
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution};

    /// Forward output, running statistics and the gradients of input, gamma and beta, against
    /// burn's own training-mode BatchNorm.
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

        let run = |bn: &BatchNorm, fused: bool| {
            let x = x.clone().detach().require_grad();
            let y = if fused {
                forward(bn, x.clone())
            } else {
                bn.forward(x.clone())
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            let values = |t: Tensor<1>| t.into_data().iter::<f32>().collect::<Vec<_>>();
            (
                y.into_data().iter::<f32>().collect::<Vec<_>>(),
                x.grad(&grads)
                    .unwrap()
                    .into_data()
                    .iter::<f32>()
                    .collect::<Vec<_>>(),
                values(bn.gamma.grad(&grads).unwrap().reshape([6])),
                values(bn.beta.grad(&grads).unwrap().reshape([6])),
            )
        };
        assert!(takes_fused_path(&ours, &x));
        let fused = run(&ours, true);
        let plain = run(&theirs, false);
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{what}[{i}]: fused {x} vs burn {y}"
                );
            }
        };
        close(&fused.0, &plain.0, "output");
        close(&fused.1, &plain.1, "input gradient");
        close(&fused.2, &plain.2, "gamma gradient");
        close(&fused.3, &plain.3, "beta gradient");

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
}
