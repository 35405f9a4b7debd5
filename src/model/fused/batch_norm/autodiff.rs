//! The fused BatchNorm under autodiff: the forward keeps its input, gamma, batch statistics
//! (and its output, where a ReLU is fused in) for a backward that runs the fused backward on the
//! inner backend.

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
    /// Input, gamma, the batch statistics the forward computed, epsilon, and the output
    /// when a ReLU was fused in.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
        Option<FloatTensor<B>>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, mean, variance, epsilon, relu_output) = ops.state;
        let (x_grad, gamma_grad, beta_grad) = match relu_output {
            None => B::fused_batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad),
            Some(output) => B::fused_batch_norm_relu_train_backward(
                x, gamma, mean, variance, epsilon, grad, output,
            ),
        };
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

#[derive(Debug)]
struct FusedBatchNormAddReluTrain;

impl<B: Backend + FusedBatchNormOps> Backward<B, 4> for FusedBatchNormAddReluTrain {
    /// Input, gamma, the batch statistics, epsilon, and the output.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
        FloatTensor<B>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta, node_residual] = ops.parents;
        let (x, gamma, mean, variance, epsilon, output) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (x_grad, gamma_grad, beta_grad, residual_grad) =
            B::fused_batch_norm_add_relu_train_backward(
                x, gamma, mean, variance, epsilon, grad, output,
            );
        for (node, value) in [
            (node_x, x_grad),
            (node_gamma, gamma_grad),
            (node_beta, beta_grad),
            (node_residual, residual_grad),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, value);
            }
        }
    }
}

impl<B: Backend + FusedBatchNormOps, C: CheckpointStrategy> FusedBatchNormOps for Autodiff<B, C> {
    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let nodes = [x.node(), gamma.node(), beta.node(), residual.node()];
        let (x, gamma, beta, residual) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
            residual.into_primitive(),
        );
        let (output, mean, variance) =
            B::fused_batch_norm_add_relu_train(x.clone(), gamma.clone(), beta, residual, epsilon);
        let output = match FusedBatchNormAddReluTrain
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    x,
                    gamma,
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                    output.clone(),
                );
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        (output, Self::from_inner(mean), Self::from_inner(variance))
    }

    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        let (output, mean, variance) =
            B::fused_batch_norm_train(x.clone(), gamma.clone(), beta, epsilon, relu);
        let output = match FusedBatchNormTrain
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let relu_output = relu.then(|| output.clone());
                let state = (
                    x,
                    gamma,
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                    relu_output,
                );
                prep.finish(state, output)
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

    /// Not differentiated again: computed on the inner backend, outside the graph.
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
    ) {
        let (dx, dgamma, dbeta, dresidual) = B::fused_batch_norm_add_relu_train_backward(
            Self::inner(x),
            Self::inner(gamma),
            Self::inner(mean),
            Self::inner(variance),
            epsilon,
            Self::inner(output_grad),
            Self::inner(output),
        );
        (
            Self::from_inner(dx),
            Self::from_inner(dgamma),
            Self::from_inner(dbeta),
            Self::from_inner(dresidual),
        )
    }

    /// Not differentiated again: computed on the inner backend, outside the graph.
    fn fused_batch_norm_relu_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
        output: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dgamma, dbeta) = B::fused_batch_norm_relu_train_backward(
            Self::inner(x),
            Self::inner(gamma),
            Self::inner(mean),
            Self::inner(variance),
            epsilon,
            Self::inner(output_grad),
            Self::inner(output),
        );
        (
            Self::from_inner(dx),
            Self::from_inner(dgamma),
            Self::from_inner(dbeta),
        )
    }
}
