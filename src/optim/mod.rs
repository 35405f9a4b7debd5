//! Optimizers and learning-rate schedules.

pub mod adam;
#[cfg(feature = "flex")]
pub(crate) mod fused;
pub mod lars;
pub mod loss_scale;
pub mod schedule;

use anyhow::{Result, bail};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, ModuleOptimizer, SgdConfig};
use schedule::LrSchedule;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Adamw,
    /// SGD with momentum and no dampening (PyTorch's semantics).
    Sgd,
    /// LARS: SGD with momentum and a per-layer trust ratio (the BYOL paper's optimizer).
    Lars,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Base learning rate (before warmup and decay).
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: usize,
    pub schedule: LrSchedule,
    /// Multiply `lr` by batch size / 256 (the paper's and solo-learn's linear scaling rule).
    #[serde(default)]
    pub scale_lr_by_batch: bool,
    /// Momentum of SGD and LARS.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// LARS trust coefficient.
    #[serde(default = "default_eta")]
    pub eta: f64,
    /// LARS: cap the adapted rate at the base rate (solo-learn's `clip_lr`).
    #[serde(default)]
    pub clip_lr: bool,
    /// LARS: no weight decay and no adaptation for biases and BatchNorm parameters.
    #[serde(default = "default_true")]
    pub exclude_bias_and_norm: bool,
}

fn default_momentum() -> f64 {
    0.9
}
fn default_eta() -> f64 {
    1e-3
}
fn default_true() -> bool {
    true
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!(
                "config field `optimizer.lr` must be a positive number, got {}",
                self.lr
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!(
                "config field `optimizer.weight_decay` must be >= 0, got {}",
                self.weight_decay
            );
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!(
                "config field `optimizer.momentum` must be within [0, 1), got {}",
                self.momentum
            );
        }
        if !(self.eta > 0.0 && self.eta.is_finite()) {
            bail!(
                "config field `optimizer.eta` must be a positive number, got {}",
                self.eta
            );
        }
        Ok(())
    }

    /// The optimizer over a whole module; PyTorch's defaults where burn's differ (Adam's
    /// epsilon 1e-8, SGD without dampening).
    pub fn build(&self) -> ModuleOptimizer {
        let decay =
            (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay as f32));
        match self.kind {
            OptimizerKind::Adam => ModuleOptimizer::from(adam::Adam::new(decay.map(|d| d.penalty))),
            OptimizerKind::Adamw => AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(self.weight_decay as f32)
                .init(),
            OptimizerKind::Sgd => SgdConfig::new()
                .with_weight_decay(decay)
                .with_momentum(Some(
                    MomentumConfig::new()
                        .with_momentum(self.momentum)
                        .with_dampening(0.0),
                ))
                .init(),
            OptimizerKind::Lars => ModuleOptimizer::from(lars::Lars {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                eta: self.eta,
                clip_lr: self.clip_lr,
                exclude_bias_and_norm: self.exclude_bias_and_norm,
            }),
        }
    }

    /// The base rate after the batch-size scaling rule, if on.
    pub fn base_lr(&self, batch_size: usize) -> f64 {
        if self.scale_lr_by_batch {
            self.lr * batch_size as f64 / 256.0
        } else {
            self.lr
        }
    }

    /// The learning rate at `step` of `total_steps`, warmup included.
    pub fn lr_at(
        &self,
        batch_size: usize,
        step: usize,
        steps_per_epoch: usize,
        total_steps: usize,
    ) -> f64 {
        let warmup_steps = self.warmup_epochs * steps_per_epoch;
        let base = self.base_lr(batch_size);
        schedule::lr_at(self.schedule, base, step, warmup_steps, total_steps)
    }
}
