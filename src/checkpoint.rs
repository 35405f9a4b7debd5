//! Checkpoints: the online and target networks as burnpack files, plus where training stood.

use crate::io::write_atomic;
use crate::model::byol::{Byol, ByolConfig, Encoder, OnlineNetwork};
use anyhow::{Context, Result};
use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use std::path::Path;

const ONLINE: &str = "online.bpk";
const TARGET: &str = "target.bpk";
const STATE: &str = "state.json";

/// Where training stood when the checkpoint was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub epoch: usize,
    pub step: usize,
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

/// Writes `dir/{online.bpk,target.bpk,state.json}`, each file atomically; the state file goes
/// last, so a checkpoint whose state names an epoch has that epoch's weights.
pub fn save(dir: &Path, byol: &Byol, state: &TrainingState) -> Result<()> {
    save_module(&byol.online, &dir.join(ONLINE))?;
    save_module(&byol.target, &dir.join(TARGET))?;
    write_atomic(
        &dir.join(STATE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

/// Loads a checkpoint written by [`save`] into networks built from `config`.
pub fn load(dir: &Path, config: &ByolConfig, device: &Device) -> Result<(Byol, TrainingState)> {
    let state_path = dir.join(STATE);
    let state: TrainingState = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("invalid {}", state_path.display()))?;
    let fresh = config.init(device);
    let online: OnlineNetwork = load_module(fresh.online, &dir.join(ONLINE))?;
    let target: Encoder = load_module(fresh.target, &dir.join(TARGET))?.no_grad();
    Ok((Byol { online, target }, state))
}

/// A finished or running training run, opened for evaluation.
pub struct OpenedRun {
    pub config: crate::config::TrainConfig,
    pub byol: Byol,
    pub state: TrainingState,
}

/// Opens `path`: a run directory (with `config.toml` and `checkpoints/last/`) or a checkpoint
/// directory inside one.
pub fn open_run(path: &Path, device: &Device) -> Result<OpenedRun> {
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
