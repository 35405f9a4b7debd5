//! The resolved configuration of a run: a preset, then an optional TOML file, then CLI flags.

use crate::data::augment::AugmentConfig;
use crate::ema::TauSchedule;
use crate::eval::knn::Vote;
use crate::model::byol::ByolConfig;
use crate::model::precision::Precision;
use crate::optim::OptimizerConfig;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Every setting of a training run; `config.toml` in a run directory is this, serialised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The preset this configuration started from (empty for one written from scratch).
    #[serde(default)]
    pub based_on: String,
    pub model: ByolConfig,
    pub optimizer: OptimizerConfig,
    pub ema: EmaConfig,
    pub data: DataConfig,
    pub train: LoopConfig,
    pub knn: KnnConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    pub tau_base: f64,
    pub schedule: TauSchedule,
    /// Also average BatchNorm running statistics (otherwise the target keeps its own).
    pub average_bn_stats: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Images are resized to this square side when they are loaded.
    pub image_size: usize,
    pub batch_size: usize,
    /// Class-balanced subset of this many training images; 0 takes them all.
    pub train_limit: usize,
    /// Augmentation threads; 0 uses every core.
    pub workers: usize,
    /// Leave undecodable images out (with a warning) instead of stopping.
    #[serde(default)]
    pub skip_bad: bool,
    pub augment: AugmentConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    pub epochs: usize,
    pub seed: u64,
    /// Batches whose gradients are summed into one optimizer step (and one EMA update), for
    /// an effective batch of `batch_size x accumulate` where memory holds only `batch_size`.
    /// BatchNorm still sees each batch on its own.
    #[serde(default = "default_accumulate")]
    pub accumulate: usize,
    /// Float type of the convolutions and linear layers (`bf16`, `f16`: mixed precision with
    /// f32 weights, BatchNorm, loss and EMA, f16 with a dynamic loss scale; see
    /// `model::precision`).
    #[serde(default)]
    pub precision: Precision,
    /// Also keep a snapshot `checkpoints/epoch-NNNN` every this many epochs (0: only `last`).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// How many of those snapshots to keep, newest first.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Collapse guard: stop when `projection_std * sqrt(dim)` (1 for a healthy spread, 0 when
    /// every image maps to one point) stays under this for `collapse_patience` epochs.
    #[serde(default = "default_collapse_threshold")]
    pub collapse_threshold: f64,
    /// Epochs under the threshold before stopping; 0 turns the guard off.
    #[serde(default = "default_collapse_patience")]
    pub collapse_patience: usize,
}

fn default_accumulate() -> usize {
    1
}
fn default_keep() -> usize {
    3
}
fn default_collapse_threshold() -> f64 {
    0.05
}
fn default_collapse_patience() -> usize {
    3
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnConfig {
    /// Run the kNN monitor every this many epochs (and before training); 0 turns it off.
    pub every: usize,
    pub k: usize,
    pub temperature: f64,
    pub vote: Vote,
}

/// Built-in presets, shipped as TOML inside the binary.
pub const PRESETS: &[(&str, &str)] = &[
    ("seed", include_str!("../presets/seed.toml")),
    ("paper", include_str!("../presets/paper.toml")),
    ("cifar10", include_str!("../presets/cifar10.toml")),
];

impl TrainConfig {
    pub fn preset(name: &str) -> Result<Self> {
        let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
            bail!("unknown preset `{name}` (available: {})", names.join(", "));
        };
        let mut config =
            Self::from_toml(text).with_context(|| format!("built-in preset `{name}`"))?;
        config.based_on = name.to_string();
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Rejects values that would only fail later, naming the field.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, field: &str, rule: &str| {
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("config field `{field}` must be {rule}"))
            }
        };
        let width = self.model.backbone.width;
        check(
            width > 0.0 && width.is_finite(),
            "model.backbone.width",
            "a positive number",
        )?;
        check(
            self.model.projector.hidden_dim > 0,
            "model.projector.hidden_dim",
            "at least 1",
        )?;
        check(
            self.model.projector.output_dim > 0,
            "model.projector.output_dim",
            "at least 1",
        )?;
        check(
            self.model.predictor.hidden_dim > 0,
            "model.predictor.hidden_dim",
            "at least 1",
        )?;
        check(
            self.model.predictor.output_dim == self.model.projector.output_dim,
            "model.predictor.output_dim",
            "equal to model.projector.output_dim (the prediction regresses the target projection)",
        )?;
        check(
            (0.0..=1.0).contains(&self.ema.tau_base),
            "ema.tau_base",
            "within [0, 1]",
        )?;
        check(self.data.image_size >= 8, "data.image_size", "at least 8")?;
        check(
            self.data.batch_size >= 2,
            "data.batch_size",
            "at least 2 (BatchNorm needs a batch)",
        )?;
        check(self.train.epochs >= 1, "train.epochs", "at least 1")?;
        check(self.train.accumulate >= 1, "train.accumulate", "at least 1")?;
        check(self.knn.k >= 1, "knn.k", "at least 1")?;
        check(self.knn.temperature > 0.0, "knn.temperature", "positive")?;
        self.optimizer.validate()?;
        self.data.augment.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_round_trips() {
        for (name, _) in PRESETS {
            let config = TrainConfig::preset(name).unwrap();
            let back = TrainConfig::from_toml(&config.to_toml()).unwrap();
            assert_eq!(config, back, "{name}");
        }
    }

    #[test]
    fn seed_preset_is_the_article_setup() {
        let c = TrainConfig::preset("seed").unwrap();
        assert_eq!(
            (c.model.projector.hidden_dim, c.model.projector.batch_norm),
            (2048, true)
        );
        assert_eq!(
            (c.model.predictor.hidden_dim, c.model.predictor.batch_norm),
            (2048, false)
        );
        assert_eq!(c.model.projector.output_dim, 256);
        assert_eq!(
            (c.ema.tau_base, c.ema.schedule),
            (0.99, TauSchedule::Constant)
        );
        assert_eq!(c.optimizer.lr, 3e-4);
    }

    #[test]
    fn paper_and_cifar10_presets_are_lars_recipes() {
        let paper = TrainConfig::preset("paper").unwrap();
        assert_eq!(paper.optimizer.kind, crate::optim::OptimizerKind::Lars);
        assert_eq!(paper.optimizer.base_lr(512), 0.4);
        assert_eq!(
            (paper.ema.tau_base, paper.ema.schedule),
            (0.996, TauSchedule::Cosine)
        );
        assert_eq!(
            (
                paper.model.predictor.hidden_dim,
                paper.model.predictor.batch_norm
            ),
            (4096, true)
        );
        let cifar = TrainConfig::preset("cifar10").unwrap();
        assert_eq!(
            (
                cifar.optimizer.lr,
                cifar.optimizer.eta,
                cifar.optimizer.weight_decay
            ),
            (1.0, 0.02, 1e-5)
        );
        assert!(cifar.optimizer.clip_lr && cifar.optimizer.scale_lr_by_batch);
        assert_eq!(
            cifar.data.augment.view1.blur_p + cifar.data.augment.view2.blur_p,
            0.0
        );
        assert_eq!(
            (
                cifar.data.augment.view1.solarize_p,
                cifar.data.augment.view2.solarize_p
            ),
            (0.0, 0.2)
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let text = TrainConfig::preset("seed")
            .unwrap()
            .to_toml()
            .replace("[train]", "[train]\nepoks = 3");
        let err = format!("{:#}", TrainConfig::from_toml(&text).unwrap_err());
        assert!(err.contains("epoks"), "{err}");
        let text = TrainConfig::preset("seed")
            .unwrap()
            .to_toml()
            .replace("tau_base = 0.99", "tau_base = 1.5");
        let err = format!("{:#}", TrainConfig::from_toml(&text).unwrap_err());
        assert!(err.contains("ema.tau_base"), "{err}");
        assert!(
            TrainConfig::preset("nope")
                .unwrap_err()
                .to_string()
                .contains("seed")
        );
    }
}
