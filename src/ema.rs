//! The target network's exponential moving average of the online weights.

#[cfg(feature = "flex")]
use burn::backend::{backend_extension, tensor::FloatTensor};
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

/// One EMA step on one tensor: `tau * target + (1 - tau) * online`, on flex as one parallel
/// pass in place (burn's ops, each on one thread below 4 Mi values, took three; see
/// [`crate::optim::fused`]), with the same operations, so that the values agree to the bit.
pub fn ema_step<const D: usize>(target: Tensor<D>, online: Tensor<D>, tau: f64) -> Tensor<D> {
    // The target lives on the autodiff device, never tracked: the arithmetic needs no graph.
    let autodiff = target.is_autodiff();
    let (target, online) = (target.inner(), online.inner());
    #[cfg(feature = "flex")]
    let blended = if crate::optim::fused::applies(&target, &online) {
        Tensor::from_dispatch(<burn::backend::Dispatch as FusedEmaOps>::fused_ema_step(
            target.into_dispatch(),
            online.into_dispatch(),
            tau,
        ))
    } else {
        ema_step_on_burn_ops(target, online, tau)
    };
    #[cfg(not(feature = "flex"))]
    let blended = ema_step_on_burn_ops(target, online, tau);
    if autodiff {
        blended.autodiff()
    } else {
        blended
    }
}

fn ema_step_on_burn_ops<const D: usize>(
    target: Tensor<D>,
    online: Tensor<D>,
    tau: f64,
) -> Tensor<D> {
    target.mul_scalar(tau) + online.mul_scalar(1.0 - tau)
}

#[cfg(feature = "flex")]
#[backend_extension(Flex)]
pub trait FusedEmaOps: burn::backend::Backend {
    /// `tau * target + (1 - tau) * online`, written into `target`'s buffer.
    fn fused_ema_step(
        target: FloatTensor<Self>,
        online: FloatTensor<Self>,
        tau: f64,
    ) -> FloatTensor<Self>;
}

#[cfg(feature = "flex")]
mod flex {
    use super::FusedEmaOps;
    use crate::model::fused::contiguous_f32;
    use crate::optim::fused::{CHUNK, contiguous, values_mut};
    use burn::backend::Flex;
    use burn::backend::tensor::FloatTensor;
    use rayon::prelude::*;

    impl FusedEmaOps for Flex {
        fn fused_ema_step(
            target: FloatTensor<Flex>,
            online: FloatTensor<Flex>,
            tau: f64,
        ) -> FloatTensor<Flex> {
            // burn's `mul_scalar` multiplies by the scalar as f32.
            let (keep, take) = (tau as f32, (1.0 - tau) as f32);
            let online = contiguous_f32(&online);
            let mut target = contiguous(target);
            values_mut(&mut target)
                .par_chunks_mut(CHUNK)
                .zip(online.par_chunks(CHUNK))
                .for_each(|(t, o)| {
                    for (t, &o) in t.iter_mut().zip(o) {
                        *t = *t * keep + o * take;
                    }
                });
            target
        }
    }
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

    #[cfg(feature = "flex")]
    /// The fused pass against burn's ops on a tensor of several parallel chunks, to the bit, on
    /// the autodiff device where the target lives (the result stays there).
    #[test]
    fn fused_step_matches_burns_ops_to_the_bit() {
        use burn::tensor::Distribution;
        let device = Device::default().autodiff();
        let shape = [3, crate::optim::fused::CHUNK + 9];
        let target = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let online = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        assert!(crate::optim::fused::applies(
            &target.clone().inner(),
            &online.clone().inner()
        ));
        let want = flat(ema_step_on_burn_ops(target.clone(), online.clone(), 0.996));
        let got = ema_step(target, online, 0.996);
        assert!(got.is_autodiff());
        assert_eq!(flat(got), want);
    }
}
