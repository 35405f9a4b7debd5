//! The target network's exponential moving average of the online weights.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// How the EMA rate tau moves over training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TauSchedule {
    /// tau stays at its base value (the article: 0.99).
    Constant,
    /// The paper's schedule: from the base value at step 0 up to 1 at the last step.
    Cosine,
}

/// tau at `step` of `total_steps`. The cosine form is
/// `1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2` (Grill et al. 2020, section 3.2).
pub fn tau_at(schedule: TauSchedule, tau_base: f64, step: usize, total_steps: usize) -> f64 {
    match schedule {
        TauSchedule::Constant => tau_base,
        TauSchedule::Cosine => {
            let progress = step.min(total_steps) as f64 / total_steps.max(1) as f64;
            1.0 - (1.0 - tau_base) * ((PI * progress).cos() + 1.0) / 2.0
        }
    }
}

/// One EMA step on one tensor: `tau * target + (1 - tau) * online`.
pub fn ema_step<const D: usize>(target: Tensor<D>, online: Tensor<D>, tau: f64) -> Tensor<D> {
    target.mul_scalar(tau) + online.mul_scalar(1.0 - tau)
}

/// BatchNorm buffers are visited like parameters; their field names tell them apart.
fn is_running_statistic(path: &[String]) -> bool {
    matches!(
        path.last().map(String::as_str),
        Some("running_mean" | "running_var")
    )
}

/// Collects the online module's tensors in traversal order, flattened, so that they can be
/// paired with the target's tensors of any rank.
#[derive(Default)]
struct Collect {
    path: Vec<String>,
    include_running_stats: bool,
    tensors: Vec<Tensor<1>>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.include_running_stats || !is_running_statistic(&self.path) {
            let value = param.val().detach();
            let n = value.shape().num_elements();
            self.tensors.push(value.reshape([n]));
        }
    }
}

struct Blend {
    path: Vec<String>,
    include_running_stats: bool,
    online: std::vec::IntoIter<Tensor<1>>,
    tau: f64,
}

impl ModuleMapper for Blend {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.include_running_stats && is_running_statistic(&self.path) {
            return param;
        }
        let online = self
            .online
            .next()
            .expect("online and target have the same structure");
        let tau = self.tau;
        param.map(|target| {
            let online = online.reshape(target.shape());
            ema_step(target, online, tau).detach()
        })
    }
}

/// `target <- tau * target + (1 - tau) * online` for every parameter (and, optionally, every
/// BatchNorm running statistic). Both modules must share one structure.
pub fn update_target<M: Module>(target: M, online: &M, tau: f64, include_running_stats: bool) -> M {
    if include_running_stats {
        crate::model::sync_running_stats(online);
        crate::model::sync_running_stats(&target);
    }
    let mut collect = Collect {
        include_running_stats,
        ..Default::default()
    };
    online.visit(&mut collect);
    let mut blend = Blend {
        path: Vec::new(),
        include_running_stats,
        online: collect.tensors.into_iter(),
        tau,
    };
    let target = target.map(&mut blend);
    assert!(
        blend.online.next().is_none(),
        "online module has more tensors than the target"
    );
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
    use burn::tensor::Device;

    #[test]
    fn cosine_schedule_starts_at_base_and_ends_at_one() {
        assert_eq!(tau_at(TauSchedule::Cosine, 0.996, 0, 1000), 0.996);
        assert!((tau_at(TauSchedule::Cosine, 0.996, 1000, 1000) - 1.0).abs() < 1e-15);
        let half = tau_at(TauSchedule::Cosine, 0.996, 500, 1000);
        assert!((half - 0.998).abs() < 1e-12, "{half}");
        assert_eq!(tau_at(TauSchedule::Constant, 0.99, 700, 1000), 0.99);
    }

    #[test]
    fn ema_step_is_exact_against_the_formula() {
        let device = Device::default();
        let target = Tensor::<1>::from_floats([1.0, -2.0, 0.5], &device);
        let online = Tensor::<1>::from_floats([3.0, 4.0, -1.0], &device);
        let got = ema_step(target, online, 0.75)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want: Vec<f32> = [(1.0f32, 3.0f32), (-2.0, 4.0), (0.5, -1.0)]
            .iter()
            .map(|(t, o)| (0.75f64 * *t as f64 + 0.25 * *o as f64) as f32)
            .collect();
        assert_eq!(got, want);
    }

    #[derive(Module, Debug)]
    struct Small {
        linear: Linear,
        bn: BatchNorm,
    }

    fn small(device: &Device) -> Small {
        Small {
            linear: LinearConfig::new(2, 3).init(device),
            bn: BatchNormConfig::new(3).init(device),
        }
    }

    fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn update_target_blends_every_parameter_and_skips_running_stats_unless_asked() {
        let device = Device::default();
        let online = small(&device);
        let target = small(&device);
        online
            .bn
            .running_mean
            .update(Tensor::from_floats([1.0, 1.0, 1.0], &device));
        let (t_w, o_w) = (
            flat(target.linear.weight.val()),
            flat(online.linear.weight.val()),
        );
        let tau = 0.9;

        let target = update_target(target, &online, tau, false);
        let got = flat(target.linear.weight.val());
        for ((g, t), o) in got.iter().zip(&t_w).zip(&o_w) {
            assert!((g - (0.9 * t + 0.1 * o)).abs() < 1e-6);
        }
        assert_eq!(flat(target.bn.running_mean.value()), vec![0.0; 3]);

        let target = update_target(target, &online, tau, true);
        let mean = flat(target.bn.running_mean.value());
        assert!(mean.iter().all(|m| (m - 0.1).abs() < 1e-6), "{mean:?}");
    }
}
