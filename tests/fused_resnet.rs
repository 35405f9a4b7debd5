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
    for architecture in [Architecture::Resnet18, Architecture::Resnet50] {
        let config = BackboneConfig {
            architecture,
            stem: Stem::Cifar,
            width: 0.125,
        };
        let net = config.init(&device);
        // 16x16: the last stage's norms then see 16 values per channel (at 8x8, 4), whose
        // variance is not so small that float rounding dominates the comparison.
        let images = Tensor::<4>::random([4, 3, 16, 16], Distribution::Normal(0.0, 1.0), &device);
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
            let error = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(scale > 0.0, "{architecture:?} {what}: all zero");
            assert!(
                error <= 1e-3 * scale,
                "{architecture:?} {what}: fused differs from burn's by {error} (scale {scale})"
            );
        }
    }
}
