//! Optimizers and learning-rate schedules.

pub mod schedule;

use anyhow::{Result, bail};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};
use schedule::LrSchedule;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Adamw,
    /// SGD with momentum 0.9 and no dampening (PyTorch's semantics).
    Sgd,
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
        Ok(())
    }

    /// The optimizer over a whole module; PyTorch's defaults where burn's differ (Adam's
    /// epsilon 1e-8, SGD without dampening).
    pub fn build(&self) -> ModuleOptimizer {
        let decay =
            (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay as f32));
        match self.kind {
            OptimizerKind::Adam => AdamConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(decay)
                .init(),
            OptimizerKind::Adamw => AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(self.weight_decay as f32)
                .init(),
            OptimizerKind::Sgd => SgdConfig::new()
                .with_weight_decay(decay)
                .with_momentum(Some(
                    MomentumConfig::new().with_momentum(0.9).with_dampening(0.0),
                ))
                .init(),
        }
    }

    /// The learning rate at `step` of `total_steps`, warmup included.
    pub fn lr_at(&self, step: usize, steps_per_epoch: usize, total_steps: usize) -> f64 {
        schedule::lr_at(
            self.schedule,
            self.lr,
            step,
            self.warmup_epochs * steps_per_epoch,
            total_steps,
        )
    }
}
