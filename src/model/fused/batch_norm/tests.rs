use super::*;
use burn::nn::BatchNormConfig;
use burn::tensor::{Device, Distribution};

/// Forward output, running statistics and the gradients of input, gamma and beta, against
/// burn's own training-mode BatchNorm, alone, with a ReLU after it, and with a residual
/// added before the ReLU.
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

    // A residual added before the ReLU, as at the end of a block.
    let residual = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(0.0, 1.0), &device);
    let run = |bn: &BatchNorm, fused: bool, variant: usize| {
        use burn::tensor::activation::relu;
        let x = x.clone().detach().require_grad();
        let r = residual.clone().detach().require_grad();
        let y = match (fused, variant) {
            (true, 0) => forward(bn, x.clone()),
            (true, 1) => forward_relu(bn, x.clone()),
            (true, _) => forward_add_relu(bn, x.clone(), r.clone()),
            (false, 0) => bn.forward(x.clone()),
            (false, 1) => relu(bn.forward(x.clone())),
            (false, _) => relu(bn.forward(x.clone()) + r.clone()),
        };
        let grads = (y.clone() * weights.clone()).sum().backward();
        let values = |t: Tensor<1>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
        (
            flat(y),
            flat(x.grad(&grads).unwrap()),
            values(bn.gamma.grad(&grads).unwrap().reshape([6])),
            values(bn.beta.grad(&grads).unwrap().reshape([6])),
            r.grad(&grads).map(flat),
        )
    };
    assert!(takes_fused_path(&ours, &x));
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}[{i}]: fused {x} vs burn {y}"
            );
        }
    };
    for (variant, what) in ["norm", "norm + relu", "norm + residual + relu"]
        .iter()
        .enumerate()
    {
        let fused = run(&ours, true, variant);
        let plain = run(&theirs, false, variant);
        close(&fused.0, &plain.0, &format!("{what}: output"));
        close(&fused.1, &plain.1, &format!("{what}: input gradient"));
        close(&fused.2, &plain.2, &format!("{what}: gamma gradient"));
        close(&fused.3, &plain.3, &format!("{what}: beta gradient"));
        if variant > 0 {
            // The ReLU clamped something, and masked some gradient.
            assert!(fused.0.contains(&0.0) && fused.0.iter().any(|&v| v > 0.0));
        }
        if variant == 2 {
            let (a, b) = (fused.4.expect("residual gradient"), plain.4.unwrap());
            close(&a, &b, &format!("{what}: residual gradient"));
        }
    }

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

/// A NaN in the input comes out of the fused ReLU as NaN, as from burn's, so that the
/// trainer's non-finite-loss guard still sees a blow-up.
#[test]
fn fused_relu_keeps_nan_as_burns_relu_does() {
    let device = Device::flex().autodiff();
    let mut values = vec![0.5f32; 2 * 3 * 4];
    values[5] = f32::NAN;
    let x = Tensor::<4>::from_data(burn::tensor::TensorData::new(values, [2, 3, 2, 2]), &device);
    let nans = |y: Tensor<4>| y.into_data().iter::<f32>().filter(|v| v.is_nan()).count();
    let bn = BatchNormConfig::new(3).init(&device);
    assert!(takes_fused_path(&bn, &x));
    let fused = nans(forward_relu(&bn, x.clone()));
    let theirs = nans(burn::tensor::activation::relu(bn.forward(x)));
    assert!(theirs > 0);
    assert_eq!(fused, theirs);
}

/// With the running statistics (inference, no autodiff) the scale and shift matches burn's
/// inference BatchNorm, alone and with the residual add + ReLU after it.
#[test]
fn inference_matches_burns_batch_norm() {
    use burn::module::Module;
    let device = Device::flex().autodiff();
    device.seed(4);
    let mut bn = BatchNormConfig::new(6).init(&device);
    bn.gamma = burn::module::Param::from_tensor(Tensor::<1>::random(
        [6],
        Distribution::Uniform(0.5, 1.5),
        &device,
    ));
    bn.beta = burn::module::Param::from_tensor(Tensor::<1>::random(
        [6],
        Distribution::Uniform(-0.5, 0.5),
        &device,
    ));
    // Running statistics away from their initial 0 and 1.
    for _ in 0..3 {
        let x = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(1.5, 2.0), &device);
        let _ = bn.forward(x);
    }
    let bn = bn.valid();
    let plain = Device::flex();
    let x = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(1.5, 2.0), &plain);
    let residual = Tensor::<4>::random([5, 6, 7, 3], Distribution::Normal(0.0, 1.0), &plain);
    assert!(!in_training(&bn, &x));
    let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
    let relu = burn::tensor::activation::relu::<4>;
    for (ours, theirs) in [
        (forward(&bn, x.clone()), bn.forward(x.clone())),
        (
            forward_add_relu(&bn, x.clone(), residual.clone()),
            relu(bn.forward(x.clone()) + residual.clone()),
        ),
    ] {
        for (p, q) in flat(ours).iter().zip(flat(theirs)) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}
