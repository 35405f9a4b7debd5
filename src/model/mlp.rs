//! The projector and predictor heads: Linear, optional BatchNorm1d, ReLU, Linear.

use super::precision::linear;
use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Shape of one head. The input size comes from whatever the head sits on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    pub hidden_dim: usize,
    pub output_dim: usize,
    /// BatchNorm after the hidden layer (the paper uses it in both heads; the article's
    /// predictor leaves it out).
    pub batch_norm: bool,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub linear1: Linear,
    pub bn: Option<BatchNorm>,
    pub linear2: Linear,
}

impl MlpConfig {
    pub fn init(&self, input_dim: usize, device: &Device) -> Mlp {
        Mlp {
            linear1: LinearConfig::new(input_dim, self.hidden_dim).init(device),
            bn: self
                .batch_norm
                .then(|| BatchNormConfig::new(self.hidden_dim).init(device)),
            linear2: LinearConfig::new(self.hidden_dim, self.output_dim).init(device),
        }
    }
}

impl Mlp {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mut x = linear(&self.linear1, x);
        if let Some(bn) = &self.bn {
            x = bn.forward(x);
        }
        linear(&self.linear2, relu(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_input_to_output_dim_with_and_without_batch_norm() {
        let device = Device::default();
        for batch_norm in [true, false] {
            let mlp = MlpConfig {
                hidden_dim: 16,
                output_dim: 4,
                batch_norm,
            }
            .init(8, &device);
            assert_eq!(mlp.bn.is_some(), batch_norm);
            let y = mlp.forward(Tensor::<2>::ones([3, 8], &device));
            assert_eq!(y.dims(), [3, 4]);
        }
    }
}
