//! The BYOL pair: an online network trained by gradients and a target network that follows it
//! as an exponential moving average.

use super::mlp::{Mlp, MlpConfig};
use super::resnet::{BackboneConfig, ResNet};
use crate::ema;
use crate::loss::{regression_loss, symmetric_loss};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Architecture of both networks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByolConfig {
    pub backbone: BackboneConfig,
    pub projector: MlpConfig,
    pub predictor: MlpConfig,
    /// `false` drops the predictor (the paper's ablation, Table 5): the online projection is
    /// compared with the target's directly, which collapses when the target moves fast.
    #[serde(default = "use_predictor_default")]
    pub use_predictor: bool,
}

fn use_predictor_default() -> bool {
    true
}

/// Backbone and projector: the part the online and target networks share in shape.
#[derive(Module, Debug)]
pub struct Encoder {
    pub backbone: ResNet,
    pub projector: Mlp,
}

impl Encoder {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.projector.forward(self.backbone.forward(images))
    }
}

/// The online ("student") network: encoder plus predictor.
#[derive(Module, Debug)]
pub struct OnlineNetwork {
    pub encoder: Encoder,
    pub predictor: Option<Mlp>,
}

impl OnlineNetwork {
    fn predict(&self, projection: Tensor<2>) -> Tensor<2> {
        match &self.predictor {
            Some(predictor) => predictor.forward(projection),
            None => projection,
        }
    }
}

/// What one training forward produces.
pub struct ByolOutput {
    /// The symmetric loss, a one-element tensor carrying the online network's graph.
    pub loss: Tensor<1>,
    /// The online projections of the first view, detached (for the collapse monitor).
    pub online_projection: Tensor<2>,
}

/// Online and target networks, trained together.
#[derive(Debug)]
pub struct Byol {
    pub online: OnlineNetwork,
    pub target: Encoder,
}

impl ByolConfig {
    /// An online network of this shape; its weights are drawn lazily unless a record is
    /// loaded first.
    pub fn init_online(&self, device: &Device) -> OnlineNetwork {
        OnlineNetwork {
            encoder: self.init_encoder(device),
            predictor: self
                .use_predictor
                .then(|| self.predictor.init(self.projector.output_dim, device)),
        }
    }

    /// An encoder of this shape; its weights are drawn lazily unless a record is loaded first.
    pub fn init_encoder(&self, device: &Device) -> Encoder {
        Encoder {
            backbone: self.backbone.init(device),
            projector: self.projector.init(self.backbone.feature_dim(), device),
        }
    }

    /// A fresh online network drawn from `seed`, and a target that starts as its exact copy.
    ///
    /// burn initialises parameters lazily from the device's global generator, so a parameter
    /// first touched later (in a forward, say) would draw whatever another thread left there.
    /// Seeding and touching every parameter happen here under one process-wide lock, so the
    /// weights depend on `seed` alone.
    pub fn init(&self, device: &Device, seed: u64) -> Byol {
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        device.seed(seed);
        let online = self.init_online(device);
        super::materialize(&online);
        let target = self.target_copy(&online.encoder, device);
        Byol { online, target }
    }

    /// An independent copy of `encoder` for the target network.
    ///
    /// A `clone()` would share lazily initialised parameters (so freezing the clone could
    /// freeze the online network) and BatchNorm running statistics. Instead a new encoder is
    /// built and the online weights are loaded into it, under new parameter ids: the copy owns
    /// its parameters and its BatchNorm state. It stays on the autodiff device with gradients
    /// off, so its BatchNorm layers normalise with batch statistics in training mode, as every
    /// PyTorch reference does.
    pub fn target_copy(&self, encoder: &Encoder, device: &Device) -> Encoder {
        super::sync_running_stats(encoder);
        let copy = self
            .init_encoder(device)
            .load_record(encoder.clone().into_record());
        super::with_fresh_ids(copy).no_grad()
    }
}

impl ByolConfig {
    /// FLOPs of one training step per image pair: both views through the online network
    /// forward and backward (counted as 3 forwards) and through the target forward.
    pub fn step_flops(&self, size: usize) -> f64 {
        let mlp = |input: usize, head: &MlpConfig| {
            2.0 * (input * head.hidden_dim + head.hidden_dim * head.output_dim) as f64
        };
        let backbone = self.backbone.forward_flops(size);
        let projector = mlp(self.backbone.feature_dim(), &self.projector);
        let predictor = if self.use_predictor {
            mlp(self.projector.output_dim, &self.predictor)
        } else {
            0.0
        };
        2.0 * (3.0 * (backbone + projector + predictor) + backbone + projector)
    }
}

impl Byol {
    /// Both views through both networks; the loss of the pair.
    pub fn forward(&self, view1: Tensor<4>, view2: Tensor<4>) -> ByolOutput {
        let projection1 = self.online.encoder.forward(view1.clone());
        let projection2 = self.online.encoder.forward(view2.clone());
        let prediction1 = self.online.predict(projection1.clone());
        let prediction2 = self.online.predict(projection2);
        let target1 = self.target.forward(view1).detach();
        let target2 = self.target.forward(view2).detach();
        ByolOutput {
            loss: symmetric_loss(prediction1, prediction2, target1, target2),
            online_projection: projection1.detach(),
        }
    }

    /// The target projection of `view`, detached.
    pub fn target_projection(&self, view: Tensor<4>) -> Tensor<2> {
        self.target.forward(view).detach()
    }

    /// `view` through the online network against the other view's target projection: its
    /// term of the symmetric loss (the two terms of [`Byol::forward`]'s loss are this for
    /// `(view1, target2)` and for `(view2, target1)`), and its online projection, detached.
    pub fn online_term(&self, view: Tensor<4>, other_target: Tensor<2>) -> (Tensor<1>, Tensor<2>) {
        let projection = self.online.encoder.forward(view);
        let prediction = self.online.predict(projection.clone());
        let term = regression_loss(prediction, other_target).mean();
        (term, projection.detach())
    }

    /// Moves the target towards the online encoder by one EMA step of rate `tau`.
    pub fn update_target(self, tau: f64, include_running_stats: bool) -> Self {
        let target = ema::update_target(
            self.target,
            &self.online.encoder,
            tau,
            include_running_stats,
        );
        Byol {
            online: self.online,
            target,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resnet::{Architecture, Stem};
    use crate::optim::{OptimizerConfig, OptimizerKind, schedule::LrSchedule};
    use burn::module::{ModuleVisitor, Param, ParamId};
    use burn::optim::GradientsParams;

    pub fn tiny_config() -> ByolConfig {
        ByolConfig {
            backbone: BackboneConfig {
                architecture: Architecture::Resnet18,
                stem: Stem::Cifar,
                width: 0.125,
            },
            projector: MlpConfig {
                hidden_dim: 16,
                output_dim: 8,
                batch_norm: true,
            },
            predictor: MlpConfig {
                hidden_dim: 16,
                output_dim: 8,
                batch_norm: false,
            },
            use_predictor: true,
        }
    }

    /// Ids and flattened values of a module's trainable parameters (running statistics apart).
    #[derive(Default)]
    struct Params {
        path: Vec<String>,
        ids: Vec<ParamId>,
        values: Vec<Vec<f32>>,
        running: Vec<Vec<f32>>,
    }

    impl ModuleVisitor for Params {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val().into_data().try_to_vec::<f32>().unwrap();
            if matches!(
                self.path.last().map(String::as_str),
                Some("running_mean" | "running_var")
            ) {
                self.running.push(values);
            } else {
                self.ids.push(param.id);
                self.values.push(values);
            }
        }
    }

    fn params(module: &impl Module) -> Params {
        crate::model::sync_running_stats(module);
        let mut p = Params::default();
        module.visit(&mut p);
        p
    }

    /// Two batches of views from a fixed seed: every run tests the same data (the shared
    /// device RNG, drawn by tests in parallel, made the bf16 bound fail about once in 15 runs).
    fn views(device: &Device) -> (Tensor<4>, Tensor<4>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(VIEWS_SEED);
        let shape = [4, 3, 8, 8];
        let mut v = || {
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            Tensor::<4>::from_data(burn::tensor::TensorData::new(values, shape), device)
        };
        (v(), v())
    }

    const VIEWS_SEED: u64 = 3;

    fn adam() -> OptimizerConfig {
        OptimizerConfig {
            kind: OptimizerKind::Adam,
            lr: 1e-2,
            weight_decay: 0.0,
            warmup_epochs: 0,
            schedule: LrSchedule::Constant,
            scale_lr_by_batch: false,
            momentum: 0.9,
            eta: 1e-3,
            clip_lr: false,
            exclude_bias_and_norm: true,
        }
    }

    #[test]
    fn target_starts_as_an_independent_copy_of_the_online_encoder() {
        let device = Device::default().autodiff();
        let byol = tiny_config().init(&device, 0);
        let (online, target) = (params(&byol.online.encoder), params(&byol.target));
        assert_eq!(online.values, target.values);
        assert!(
            online.ids.iter().all(|id| !target.ids.contains(id)),
            "target shares parameter ids"
        );

        // A forward of the online network alone moves only the online BatchNorm statistics.
        let (v1, _) = views(&device);
        byol.online.encoder.forward(v1);
        let (online_after, target_after) = (params(&byol.online.encoder), params(&byol.target));
        assert_ne!(online_after.running, online.running);
        assert_eq!(target_after.running, target.running);
    }

    #[test]
    fn one_step_trains_every_online_parameter_and_the_target_moves_only_by_ema() {
        let device = Device::default().autodiff();
        let byol = tiny_config().init(&device, 0);
        let mut optimizer = adam().build();
        let before_online = params(&byol.online);
        let before_target = params(&byol.target);

        let (v1, v2) = views(&device);
        let output = byol.forward(v1, v2);
        let mut grads = output.loss.backward();
        // The target takes no gradient ...
        assert_eq!(
            GradientsParams::from_module(&mut grads, &byol.target).len(),
            0
        );
        // ... and the optimizer sees every online parameter.
        let grads = GradientsParams::from_grads(grads, &byol.online);
        assert_eq!(grads.len(), before_online.ids.len());

        let online = optimizer.step(1e-2, byol.online, grads);
        let byol = Byol {
            online,
            target: byol.target,
        };
        let after_online = params(&byol.online);
        for (i, (a, b)) in after_online
            .values
            .iter()
            .zip(&before_online.values)
            .enumerate()
        {
            assert_ne!(a, b, "online parameter {i} did not change");
        }
        assert_eq!(
            params(&byol.target).values,
            before_target.values,
            "target changed without EMA"
        );

        let tau = 0.9;
        let byol = byol.update_target(tau, false);
        let online_encoder = params(&byol.online.encoder);
        let after_target = params(&byol.target);
        for ((t, t0), o) in after_target
            .values
            .iter()
            .zip(&before_target.values)
            .zip(&online_encoder.values)
        {
            for ((t, t0), o) in t.iter().zip(t0).zip(o) {
                let want = (tau * *t0 as f64 + (1.0 - tau) * *o as f64) as f32;
                assert!(
                    (t - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{t} vs {want}"
                );
            }
        }
        // Still no gradient flows into the target after the update.
        let (v1, v2) = views(&device);
        let mut grads = byol.forward(v1, v2).loss.backward();
        assert_eq!(
            GradientsParams::from_module(&mut grads, &byol.target).len(),
            0
        );
    }

    /// Gradients taken a view at a time (`train::step_gradients`: each view's backward right
    /// after its forward) are those of the joint loss's one backward, loss scale or not, and
    /// so are the loss and the projections' spread, all read back at the end; a view that
    /// overflows makes the loss and the gradient check say so.
    #[test]
    fn gradients_a_view_at_a_time_match_the_joint_backward() {
        use crate::model::precision::Precision;
        use crate::optim::loss_scale::LossScale;

        /// Compares each parameter's gradient in `a`, times `factor`, with `b`'s.
        struct SameGradients<'a> {
            a: &'a GradientsParams,
            b: &'a GradientsParams,
            factor: f32,
            compared: usize,
        }
        impl ModuleVisitor for SameGradients<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let (Some(a), Some(b)) = (self.a.get::<D>(param.id), self.b.get::<D>(param.id))
                else {
                    return;
                };
                let [a, b] = [a, b].map(|g| g.into_data().try_to_vec::<f32>().unwrap());
                let largest = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x * self.factor - y).abs() <= 1e-4 * largest.max(1e-6),
                        "parameter {}: {} vs {y}",
                        self.compared,
                        x * self.factor
                    );
                }
                self.compared += 1;
            }
        }

        let device = Device::default().autodiff();
        let byol = tiny_config().init(&device, 0);
        let (v1, v2) = views(&device);
        let joint = byol.forward(v1.clone(), v2.clone());
        let loss = joint.loss.clone().into_scalar::<f32>() as f64;
        let spread = crate::train::projection_std(joint.online_projection.clone());
        let spread = spread.into_scalar::<f32>() as f64;
        let joint_grads = GradientsParams::from_grads(joint.loss.backward(), &byol.online);
        for scale in [None, Some(LossScale::new())] {
            let views = [v1.clone(), v2.clone()];
            let mut summed = burn::optim::GradientsAccumulator::new();
            let step = crate::train::step_gradients(
                &byol,
                views,
                Precision::F32,
                scale.as_ref(),
                0.5,
                &mut summed,
            );
            assert!(
                (step.loss - loss).abs() <= 1e-6 * loss.abs(),
                "{} vs {loss}",
                step.loss
            );
            assert!(step.finite);
            assert_eq!(step.projection_std, spread);
            let grads = summed.grads();
            assert_eq!(grads.len(), params(&byol.online).ids.len());
            let mut same = SameGradients {
                a: &grads,
                b: &joint_grads,
                factor: 2.0,
                compared: 0,
            };
            byol.online.visit(&mut same);
            assert_eq!(same.compared, grads.len(), "every parameter compared");
        }
        let overflowing = [v1.clone(), v2.mul_scalar(f32::INFINITY)];
        let step = crate::train::step_gradients(
            &byol,
            overflowing,
            Precision::F32,
            Some(&LossScale::new()),
            0.5,
            &mut burn::optim::GradientsAccumulator::new(),
        );
        assert!(!step.loss.is_finite() && !step.finite);
    }

    /// `--precision bf16`: the step's loss stays within bf16 rounding of the f32 one, every
    /// online parameter gets an f32 gradient, and the weights (online and target) stay f32.
    #[test]
    fn a_bf16_step_matches_f32_and_keeps_f32_weights_and_gradients() {
        use crate::model::precision::{Precision, autocast, parameters_are_f32};
        let device = Device::default().autodiff();
        let byol = tiny_config().init(&device, 0);
        let (v1, v2) = views(&device);
        let exact = byol
            .forward(v1.clone(), v2.clone())
            .loss
            .into_scalar::<f32>();
        let output = {
            let _bf16 = autocast(Precision::Bf16);
            byol.forward(v1, v2)
        };
        let low = output.loss.clone().into_scalar::<f32>();
        assert!(low != exact, "bf16 rounded nothing");
        assert!((low - exact).abs() < 2e-2 * exact.abs(), "{low} vs {exact}");

        let grads = GradientsParams::from_grads(output.loss.backward(), &byol.online);
        assert_eq!(grads.len(), params(&byol.online).ids.len());
        let online = adam().build().step(1e-2, byol.online, grads);
        let byol = Byol {
            online,
            target: byol.target,
        }
        .update_target(0.99, false);
        assert!(parameters_are_f32(&byol.online) && parameters_are_f32(&byol.target));
    }

    #[test]
    fn target_normalises_with_batch_statistics_during_training() {
        let device = Device::default().autodiff();
        let byol = tiny_config().init(&device, 0);
        // Batch statistics make every channel's output mean zero over the batch; the fresh
        // running statistics (mean 0, var 1) would leave the convolution's mean in place.
        let (v1, _) = views(&device);
        let a = byol
            .target
            .backbone
            .bn1
            .forward(byol.target.backbone.conv1.forward(v1.clone()));
        let mean = a
            .clone()
            .mean_dim(0)
            .mean_dim(2)
            .mean_dim(3)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(
            mean < 1e-4,
            "target BatchNorm did not use batch statistics (channel mean {mean})"
        );
    }
}
