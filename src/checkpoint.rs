//! Checkpoints: the online and target networks as burnpack files, plus where training stood.

use crate::io::write_atomic;
use crate::model::byol::{Byol, ByolConfig, Encoder, OnlineNetwork};
use crate::optim::loss_scale::LossScale;
use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const ONLINE: &str = "online.bpk";
const TARGET: &str = "target.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
const STATE: &str = "state.json";

/// Where training stood when the checkpoint was written. With the weights and the optimizer
/// state this is all a resumed run needs: data order and augmentations are functions of
/// (seed, epoch, position), learning rate and tau functions of the step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: usize,
    /// Batches done of the unfinished epoch `epoch + 1` (a checkpoint taken on Ctrl-C).
    pub batch_in_epoch: usize,
    /// Sums over those batches, for that epoch's means.
    pub loss_sum: f64,
    pub projection_std_sum: f64,
    /// Consecutive finished epochs under the collapse threshold.
    pub low_std_epochs: usize,
    /// The fp16 loss scale (`--precision f16`); absent otherwise and in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
}

fn save_module(module: &impl Module, path: &Path) -> Result<()> {
    crate::model::sync_running_stats(module);
    let bytes = module
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("cannot serialise {}: {e}", path.display()))?;
    write_atomic(path, &bytes)
}

fn load_module<M: Module>(module: M, path: &Path) -> Result<M> {
    let record = ModuleRecord::load(path)
        .map_err(|e| anyhow::anyhow!("cannot read checkpoint {}: {e}", path.display()))?;
    module
        .try_load_record(record)
        .map_err(|e| anyhow::anyhow!("checkpoint {} does not fit this model: {e}", path.display()))
}

/// Writes `dir/{online,target,optimizer}.bpk` and `dir/state.json`.
///
/// The files are written to a sibling folder which then replaces `dir` in two renames, so a
/// crash leaves either the old checkpoint or the new one (at worst under `dir.old`, which
/// [`load`] falls back to).
pub fn save(
    dir: &Path,
    byol: &Byol,
    optimizer: &ModuleOptimizer,
    state: &TrainingState,
) -> Result<()> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let staging = dir.with_file_name(format!(".{name}.new"));
    let old = dir.with_file_name(format!("{name}.old"));
    let _ = std::fs::remove_dir_all(&staging);
    save_module(&byol.online, &staging.join(ONLINE))?;
    pause_for_crash_tests("staging");
    save_module(&byol.target, &staging.join(TARGET))?;
    let optimizer_bytes = optimizer
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("cannot serialise the optimizer state: {e}"))?;
    write_atomic(&staging.join(OPTIMIZER), &optimizer_bytes)?;
    write_atomic(
        &staging.join(STATE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move {} aside", dir.display()))?;
    }
    pause_for_crash_tests("renaming");
    std::fs::rename(&staging, dir)
        .with_context(|| format!("cannot move the new checkpoint to {}", dir.display()))?;
    crate::io::sync_dir(dir.parent().unwrap_or(Path::new(".")));
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Crash-test hook: with `BYOL_TEST_CHECKPOINT_PAUSE=staging` (half the files written) or
/// `=renaming` (the old checkpoint moved aside, the new one not yet in place), a save says so
/// on stderr and waits, so a test can `kill -9` the process at that point.
fn pause_for_crash_tests(stage: &str) {
    if std::env::var("BYOL_TEST_CHECKPOINT_PAUSE").is_ok_and(|s| s == stage) {
        eprintln!("checkpoint save paused at {stage}");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// `dir`, or the previous checkpoint left at `dir.old` by a save that died between its renames.
fn existing(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let old = dir.with_file_name(format!("{name}.old"));
    if !dir.join(STATE).is_file() && old.join(STATE).is_file() {
        old
    } else {
        dir.to_path_buf()
    }
}

/// The optimizer state saved beside the weights, loaded into `optimizer`.
pub fn load_optimizer(dir: &Path, optimizer: ModuleOptimizer) -> Result<ModuleOptimizer> {
    let path = existing(dir).join(OPTIMIZER);
    optimizer
        .load(&path)
        .map_err(|e| anyhow::anyhow!("cannot read optimizer state {}: {e}", path.display()))
}

/// Loads a checkpoint written by [`save`] into networks built from `config`.
pub fn load(dir: &Path, config: &ByolConfig, device: &Device) -> Result<(Byol, TrainingState)> {
    let dir = &existing(dir);
    let state_path = dir.join(STATE);
    let state: TrainingState = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("invalid {}", state_path.display()))?;
    // Networks of the right shape, never initialised: the records fill every parameter.
    let online: OnlineNetwork = load_module(config.init_online(device), &dir.join(ONLINE))?;
    let target: Encoder = load_module(config.init_encoder(device), &dir.join(TARGET))?.no_grad();
    Ok((Byol { online, target }, state))
}

/// A finished or running training run, opened for evaluation.
pub struct OpenedRun {
    pub config: crate::config::TrainConfig,
    pub byol: Byol,
    pub state: TrainingState,
}

/// Opens `path`: a run directory (with `config.toml` and `checkpoints/last/`), a checkpoint
/// directory inside one, or a file in such a checkpoint directory.
pub fn open_run(path: &Path, device: &Device) -> Result<OpenedRun> {
    // A file inside a checkpoint directory (`online.bpk`, `state.json`) names that directory.
    let path = if path.is_file() {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    };
    let (config_path, checkpoint_dir) = if path.join("config.toml").is_file() {
        (
            path.join("config.toml"),
            path.join("checkpoints").join("last"),
        )
    } else if path.join(STATE).is_file() {
        let run = path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        (run.join("config.toml"), path.to_path_buf())
    } else {
        anyhow::bail!(
            "{} is neither a run directory (config.toml, checkpoints/last/) nor a checkpoint directory (state.json)",
            path.display()
        );
    };
    let config = crate::config::TrainConfig::load(&config_path)?;
    let (byol, state) = load(&checkpoint_dir, &config.model, device)?;
    Ok(OpenedRun {
        config,
        byol,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;

    fn tiny() -> ByolConfig {
        let mut c = TrainConfig::preset("seed").unwrap().model;
        c.backbone.width = 0.125;
        (c.projector.hidden_dim, c.projector.output_dim) = (16, 8);
        (c.predictor.hidden_dim, c.predictor.output_dim) = (16, 8);
        c
    }

    fn first_weight(byol: &Byol) -> Vec<f32> {
        byol.online
            .encoder
            .backbone
            .conv1
            .weight
            .val()
            .into_data()
            .iter::<f32>()
            .collect()
    }

    #[test]
    fn a_crash_at_any_point_of_a_save_leaves_a_loadable_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let last = dir.path().join("last");
        let device = Device::default().autodiff();
        let (config, optimizer) = (
            tiny(),
            crate::config::TrainConfig::preset("seed")
                .unwrap()
                .optimizer
                .build(),
        );
        let first = config.init(&device, 1);
        save(
            &last,
            &first,
            &optimizer,
            &TrainingState {
                epoch: 1,
                ..Default::default()
            },
        )
        .unwrap();

        // Killed while writing the new files: the staging folder is half written.
        let staging = dir.path().join(".last.new");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join(ONLINE), b"half a file").unwrap();
        let (loaded, state) = load(&last, &config, &device).unwrap();
        assert_eq!(
            (state.epoch, first_weight(&loaded)),
            (1, first_weight(&first))
        );

        // Killed between the two renames: only `last.old` holds a checkpoint.
        std::fs::rename(&last, dir.path().join("last.old")).unwrap();
        let (loaded, state) = load(&last, &config, &device).unwrap();
        assert_eq!(
            (state.epoch, first_weight(&loaded)),
            (1, first_weight(&first))
        );
        assert!(load_optimizer(&last, optimizer.clone()).is_ok());

        // The next save cleans up and replaces it.
        let second = config.init(&device, 2);
        save(
            &last,
            &second,
            &optimizer,
            &TrainingState {
                epoch: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let (loaded, state) = load(&last, &config, &device).unwrap();
        assert_eq!(
            (state.epoch, first_weight(&loaded)),
            (2, first_weight(&second))
        );
        assert!(!staging.exists() && !dir.path().join("last.old").exists());
    }

    #[test]
    fn loading_into_another_architecture_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::default().autodiff();
        let optimizer = crate::config::TrainConfig::preset("seed")
            .unwrap()
            .optimizer
            .build();
        save(
            &dir.path().join("last"),
            &tiny().init(&device, 0),
            &optimizer,
            &TrainingState::default(),
        )
        .unwrap();
        let mut wider = tiny();
        wider.backbone.width = 0.25;
        let err = format!(
            "{:#}",
            load(&dir.path().join("last"), &wider, &device)
                .err()
                .unwrap()
        );
        assert!(
            err.contains("online.bpk") && err.contains("does not fit"),
            "{err}"
        );
    }
}
