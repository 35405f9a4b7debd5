//! BYOL's regression loss: the squared distance of L2-normalised vectors, `2 - 2 cos(p, z')`.

use burn::tensor::Tensor;

/// `F.normalize(x, dim=1)`: rows divided by their L2 norm, clamped below at 1e-12.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Per-sample loss `2 - 2 cos(prediction, target)`, shape `[N]`. The target side is detached:
/// gradients flow into the online network only.
pub fn regression_loss(prediction: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    let cosine = (l2_normalize(prediction) * l2_normalize(target.detach())).sum_dim(1);
    let n = cosine.dims()[0];
    cosine.reshape([n]).mul_scalar(-2.0).add_scalar(2.0)
}

/// The symmetric BYOL loss: each view's prediction regresses the other view's target
/// projection; the two per-sample terms are summed, then averaged over the batch.
///
/// The article's listing pairs each prediction with the target of the *same* view; the paper
/// (and every reference implementation) crosses them, as done here.
pub fn symmetric_loss(
    prediction1: Tensor<2>,
    prediction2: Tensor<2>,
    target1: Tensor<2>,
    target2: Tensor<2>,
) -> Tensor<1> {
    (regression_loss(prediction1, target2) + regression_loss(prediction2, target1)).mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(rows: Vec<[f32; 3]>) -> Tensor<2> {
        let n = rows.len();
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        Tensor::from_data(TensorData::new(flat, [n, 3]), &Device::default())
    }

    fn values(x: Tensor<1>) -> Vec<f32> {
        x.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn zero_for_equal_directions_four_for_opposite_two_for_orthogonal() {
        let p = t(vec![[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]);
        let z = t(vec![[2.0, 4.0, 6.0], [-0.5, -1.0, -1.5], [0.0, 5.0, 0.0]]);
        let loss = values(regression_loss(p, z));
        let expected = [0.0, 4.0, 2.0];
        for (got, want) in loss.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{loss:?}");
        }
    }

    #[test]
    fn matches_closed_form_on_arbitrary_vectors() {
        let (a, b) = ([0.3f32, -1.2, 2.5], [1.1f32, 0.4, -0.7]);
        let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32; 3]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let expected = 2.0 - 2.0 * dot / (norm(&a) * norm(&b));
        let got = values(regression_loss(t(vec![a]), t(vec![b])))[0];
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn symmetric_loss_sums_the_crossed_terms_and_averages_over_the_batch() {
        let p1 = t(vec![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
        let p2 = t(vec![[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]);
        let z1 = t(vec![[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]);
        let z2 = t(vec![[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]);
        // Sample 0: l(p1, z2) = 0, l(p2, z1) = 0. Sample 1: l(p1, z2) = 2, l(p2, z1) = 4.
        let loss = values(symmetric_loss(p1, p2, z1, z2))[0];
        assert!((loss - 3.0).abs() < 1e-6, "{loss}");
    }
}
