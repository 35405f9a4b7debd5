//! Linear probe: softmax regression on frozen, precomputed features.
//!
//! Features are standardised with the training mean and std; the classifier is trained by
//! mini-batch SGD with momentum 0.9 and a cosine learning rate on the analytic gradient of the
//! cross-entropy, `X^T (softmax(XW + b) - Y) / n + wd W`. The weight decay is picked from a
//! small sweep on a held-out tenth of the training features, then the classifier is retrained
//! on all of them.

use super::select_rows;
use burn::tensor::{Tensor, TensorData, activation::softmax};
use serde::Serialize;

/// Settings of one probe.
#[derive(Clone, Debug)]
pub struct LinearProbeConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Candidate weight decays; the best on the held-out split is used.
    pub weight_decays: Vec<f64>,
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        LinearProbeConfig {
            epochs: 100,
            batch_size: 256,
            lr: 0.1,
            weight_decays: vec![0.0, 1e-5, 1e-4, 1e-3],
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LinearProbeResult {
    pub top1: f64,
    pub top5: f64,
    pub weight_decay: f64,
    /// Held-out accuracy of every candidate weight decay.
    pub sweep: Vec<(f64, f64)>,
}

fn one_hot(labels: &[usize], classes: usize, device: &burn::tensor::Device) -> Tensor<2> {
    let mut data = vec![0.0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        data[i * classes + l] = 1.0;
    }
    Tensor::from_data(TensorData::new(data, [labels.len(), classes]), device)
}

/// A trained linear classifier.
struct Classifier {
    weight: Tensor<2>,
    bias: Tensor<1>,
}

impl Classifier {
    fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight.clone()) + self.bias.clone().unsqueeze()
    }

    /// Top-1 and top-5 accuracy on `x` against `labels`.
    fn accuracy(&self, x: Tensor<2>, labels: &[usize]) -> (f64, f64) {
        let logits = self.logits(x);
        let [n, classes] = logits.dims();
        let k = classes.min(5);
        let top: Vec<i64> = logits
            .argsort_descending(1)
            .slice_dim(1, 0..k)
            .into_data()
            .iter::<i64>()
            .collect();
        let (mut t1, mut t5) = (0, 0);
        for (i, &label) in labels.iter().enumerate() {
            let row = &top[i * k..(i + 1) * k];
            t1 += usize::from(row[0] as usize == label);
            t5 += usize::from(row.iter().any(|&c| c as usize == label));
        }
        (t1 as f64 / n as f64, t5 as f64 / n as f64)
    }
}

fn train_classifier(
    x: &Tensor<2>,
    labels: &[usize],
    classes: usize,
    wd: f64,
    config: &LinearProbeConfig,
) -> Classifier {
    let device = x.device();
    let [n, dim] = x.dims();
    let y = one_hot(labels, classes, &device);
    let mut weight = Tensor::<2>::zeros([dim, classes], &device);
    let mut bias = Tensor::<1>::zeros([classes], &device);
    let (mut vw, mut vb) = (weight.clone(), bias.clone());
    let batches = n.div_ceil(config.batch_size);
    let total = (config.epochs * batches).max(1);
    let mut step = 0;
    for epoch in 0..config.epochs {
        let order = crate::data::loader::epoch_order(n, config.seed, epoch);
        for chunk in order.chunks(config.batch_size) {
            let lr =
                config.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            let (xb, yb) = (select_rows(x, chunk), select_rows(&y, chunk));
            let probs = softmax(
                xb.clone().matmul(weight.clone()) + bias.clone().unsqueeze(),
                1,
            );
            let diff = (probs - yb).div_scalar(chunk.len() as f64);
            let gw = xb.transpose().matmul(diff.clone()) + weight.clone().mul_scalar(wd);
            let gb = diff.sum_dim(0).reshape([classes]);
            vw = vw.mul_scalar(0.9) + gw;
            vb = vb.mul_scalar(0.9) + gb;
            weight = weight - vw.clone().mul_scalar(lr);
            bias = bias - vb.clone().mul_scalar(lr);
            step += 1;
        }
    }
    Classifier { weight, bias }
}

/// Standardises both sets with the training features' per-dimension mean and std.
fn standardise(train: Tensor<2>, test: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
    let mean = train.clone().mean_dim(0);
    let std = (train.clone() - mean.clone())
        .square()
        .mean_dim(0)
        .sqrt()
        .clamp_min(1e-6);
    ((train - mean.clone()) / std.clone(), (test - mean) / std)
}

/// Fits on (`train`, `train_labels`) and scores on (`test`, `test_labels`).
pub fn linear_probe(
    train: Tensor<2>,
    train_labels: &[usize],
    test: Tensor<2>,
    test_labels: &[usize],
    classes: usize,
    config: &LinearProbeConfig,
) -> LinearProbeResult {
    let (train, test) = standardise(train, test);
    let n = train_labels.len();
    // Every tenth sample (of a shuffled order) is held out to pick the weight decay.
    let order = crate::data::loader::epoch_order(n, config.seed, usize::MAX - 1);
    let (held, fit): (Vec<usize>, Vec<usize>) = order.iter().partition(|&&i| i % 10 == 0);
    let pick = |idx: &[usize]| idx.iter().map(|&i| train_labels[i]).collect::<Vec<_>>();
    let sweep: Vec<(f64, f64)> = if config.weight_decays.len() > 1 && held.len() >= classes {
        config
            .weight_decays
            .iter()
            .map(|&wd| {
                let c =
                    train_classifier(&select_rows(&train, &fit), &pick(&fit), classes, wd, config);
                (wd, c.accuracy(select_rows(&train, &held), &pick(&held)).0)
            })
            .collect()
    } else {
        config
            .weight_decays
            .iter()
            .map(|&wd| (wd, f64::NAN))
            .collect()
    };
    // Highest held-out accuracy; ties to the smaller decay.
    let weight_decay = sweep
        .iter()
        .fold((0.0, f64::NEG_INFINITY), |best, &(wd, acc)| {
            if acc > best.1 { (wd, acc) } else { best }
        })
        .0;
    let classifier = train_classifier(&train, train_labels, classes, weight_decay, config);
    let (top1, top5) = classifier.accuracy(test, test_labels);
    LinearProbeResult {
        top1,
        top5,
        weight_decay,
        sweep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn separable_features_are_classified_almost_perfectly() {
        let device = Device::default();
        // Three classes, each a tight cluster around its own direction in 8 dimensions.
        let n = 300;
        let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let centres: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..8).map(move |d| if d == l { 3.0 } else { 0.0 }))
            .collect();
        let noise = Tensor::<2>::random([n, 8], Distribution::Normal(0.0, 0.3), &device);
        let x = Tensor::<2>::from_data(TensorData::new(centres, [n, 8]), &device) + noise;
        let config = LinearProbeConfig {
            epochs: 20,
            batch_size: 64,
            ..Default::default()
        };
        let result = linear_probe(
            select_rows(&x, &(0..200).collect::<Vec<_>>()),
            &labels[..200],
            select_rows(&x, &(200..300).collect::<Vec<_>>()),
            &labels[200..],
            3,
            &config,
        );
        assert!(result.top1 > 0.98, "{result:?}");
        assert_eq!(result.top5, 1.0);
        assert_eq!(result.sweep.len(), 4);
    }

    #[test]
    fn random_labels_stay_near_chance_on_held_out_data() {
        let device = Device::default();
        let x = Tensor::<2>::random([400, 16], Distribution::Normal(0.0, 1.0), &device);
        let labels: Vec<usize> = (0..400).map(|i| (i * 7 + i / 3) % 4).collect();
        let config = LinearProbeConfig {
            epochs: 10,
            weight_decays: vec![1e-4],
            ..Default::default()
        };
        let result = linear_probe(
            select_rows(&x, &(0..300).collect::<Vec<_>>()),
            &labels[..300],
            select_rows(&x, &(300..400).collect::<Vec<_>>()),
            &labels[300..],
            4,
            &config,
        );
        assert!(result.top1 < 0.5, "{result:?}");
    }
}
