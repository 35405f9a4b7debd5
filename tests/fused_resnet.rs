//! A whole ResNet's training forward and backward with byol's fused operations against burn's
//! own (`byol::model::fused::set_enabled`, process-wide: hence a test binary of its own, with
//! this one test). The unit tests compare each operation; this one checks how the ResNet
//! wires them (fused pairs inside the blocks, the stem, residual adds, downsample shortcuts).

#![cfg(feature = "flex")]

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use byol::model::fused;
use byol::model::resnet::{Architecture, BackboneConfig, Stem};

#[test]
fn fused_resnet_matches_burns_ops_forward_and_backward() {
    let device = Device::flex().autodiff();
    device.seed(21);
    // Width 0.25 at 32x32 too: there every 3x3 stride-1 layer takes Winograd (channels x
    // width of 512 and up; the narrow kernels for 16 and 32 channels where the CPU has
    // AVX-512), which the width-0.125 cases never reach. Its F(4x4, 3x3) rounds to some ten
    // units in the last place of the largest terms; through the backward of the whole network
    // that moves the first layers' gradients by 0.2-0.4% (root mean square, measured), with
    // single values further off. So that case is held to 1% of each gradient's norm, which a
    // miswired or wrong operation exceeds by far; without Winograd it matches as closely as
    // the others.
    for (architecture, width, size, winograd) in [
        (Architecture::Resnet18, 0.125, 16, false),
        (Architecture::Resnet50, 0.125, 16, false),
        (Architecture::Resnet18, 0.25, 32, true),
    ] {
        let config = BackboneConfig {
            architecture,
            stem: Stem::Cifar,
            width,
        };
        let net = config.init(&device);
        // 16x16: the last stage's norms then see 16 values per channel (at 8x8, 4), whose
        // variance is not so small that float rounding dominates the comparison.
        let images =
            Tensor::<4>::random([4, 3, size, size], Distribution::Normal(0.0, 1.0), &device);
        let weights = Tensor::<2>::random(
            [4, config.feature_dim()],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let run = |ours: bool| {
            fused::set_enabled(ours);
            let images = images.clone().detach().require_grad();
            let features = net.forward(images.clone());
            let grads = (features.clone() * weights.clone()).sum().backward();
            let flat = |t: Tensor<4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
            let mut values = vec![
                (
                    "features".to_string(),
                    features.into_data().iter::<f32>().collect::<Vec<_>>(),
                ),
                (
                    "image gradient".to_string(),
                    flat(images.grad(&grads).unwrap()),
                ),
            ];
            // Every parameter's gradient, in module order.
            struct Collect<'a>(&'a burn::tensor::Gradients, Vec<(String, Vec<f32>)>);
            impl burn::module::ModuleVisitor for Collect<'_> {
                fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                    if let Some(grad) = param.grad(self.0) {
                        let name = format!("gradient of {:?} ({D}-d)", param.id);
                        self.1
                            .push((name, grad.into_data().iter::<f32>().collect()));
                    }
                }
            }
            let mut collect = Collect(&grads, Vec::new());
            net.visit(&mut collect);
            assert!(
                collect.1.len() > 20,
                "{architecture:?}: parameters with gradients"
            );
            values.extend(collect.1);
            values
        };
        let (ours, theirs) = (run(true), run(false));
        fused::set_enabled(true);
        assert_eq!(ours.len(), theirs.len());
        for ((what, a), (_, b)) in ours.iter().zip(&theirs) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{architecture:?} {what}: all zero");
            if winograd {
                let norm = |v: &mut dyn Iterator<Item = f32>| {
                    v.map(|x| f64::from(x).powi(2)).sum::<f64>().sqrt()
                };
                let error = norm(&mut a.iter().zip(b).map(|(p, q)| p - q));
                let size = norm(&mut b.iter().copied());
                assert!(
                    error <= 1e-2 * size,
                    "{architecture:?} width {width} {what}: fused differs from burn's by {error} \
                     (norm {size})"
                );
                continue;
            }
            let error = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                error <= 1e-3 * scale,
                "{architecture:?} {what}: fused differs from burn's by {error} (scale {scale})"
            );
        }
    }
}
