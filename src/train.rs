//! The BYOL training loop: augment, forward both networks, step the online one, move the
//! target by EMA, and measure with kNN.

use crate::checkpoint::{self, TrainingState};
use crate::config::TrainConfig;
use crate::data::Source;
use crate::data::folder::Dataset;
use crate::data::loader::{EpochLoader, EpochSpec, TwoViewBatch};
use crate::ema::tau_at;
use crate::eval::embed;
use crate::eval::knn::{KnnAccuracy, knn_accuracy};
use crate::io::{peak_rss_mib, write_atomic};
use crate::loss::l2_normalize;
use crate::model::StepCaches;
use crate::model::byol::{Byol, OnlineNetwork};
use crate::model::precision::{Precision, autocast};
use crate::optim::loss_scale::{self, LossScale};
use crate::report::{EpochMetrics, plot_all, read_metrics, write_metrics};
use crate::threads::SpinningWorkers;
use anyhow::{Context, Result, bail};
use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// What [`step_gradients`] reports of one training step, read back from the device at once.
pub struct StepGradients {
    /// The symmetric loss, the sum of both views' terms. Where it is not finite, neither are
    /// the gradients added.
    pub loss: f64,
    /// Whether every gradient was finite (always so without a loss scale).
    pub finite: bool,
    /// [`projection_std`] of the first view's online projections (the collapse monitor).
    pub projection_std: f64,
}

/// Adds to `grads` the gradients of `share` times BYOL's symmetric loss for `byol`'s online
/// network, a view at a time: both target projections first (detached), then each view's
/// online forward (under `precision`'s autocast), its term of the loss and at once its
/// backward (with `scale`, as [`loss_scale::backward`]). The loss is `L(p1, t2) + L(p2, t1)`
/// with constant targets, so this is the gradient of the whole loss, but only one view's
/// activations are kept at a time instead of both. Nothing is read back before the end, and
/// then every value the step reports in one transfer: a GPU runs the whole step without
/// waiting on the host.
pub fn step_gradients(
    byol: &Byol,
    [view1, view2]: [Tensor<4>; 2],
    precision: Precision,
    scale: Option<&LossScale>,
    share: f64,
    grads: &mut GradientsAccumulator<OnlineNetwork>,
) -> StepGradients {
    let [target1, target2] = {
        let _autocast = autocast(precision);
        [&view1, &view2].map(|view| byol.target_projection(view.clone()))
    };
    let mut terms = Vec::with_capacity(2);
    let mut checks = Vec::with_capacity(2);
    let mut first_projection = None;
    for (view, other_target) in [(view1, target2), (view2, target1)] {
        let (term, projection) = {
            let _autocast = autocast(precision);
            byol.online_term(view, other_target)
        };
        first_projection.get_or_insert(projection);
        terms.push(term.clone().detach());
        let (view_grads, check) = loss_scale::backward(term.mul_scalar(share), &byol.online, scale);
        checks.extend(check);
        grads.accumulate(&byol.online, view_grads);
    }
    let spread = projection_std(first_projection.expect("two views"));
    let values = read_together(terms.into_iter().chain([spread]).chain(checks));
    let (terms, rest) = values.split_at(2);
    let (spread, checks) = rest.split_first().expect("the spread was read");
    StepGradients {
        loss: terms.iter().map(|&t| t as f64).sum(),
        finite: checks.iter().all(|c| c.is_finite()),
        projection_std: *spread as f64,
    }
}

/// One-value tensors read back in a single transfer, in order, as f32.
fn read_together(scalars: impl IntoIterator<Item = Tensor<1>>) -> Vec<f32> {
    let scalars: Vec<_> = scalars
        .into_iter()
        .map(|s| s.cast(FloatDType::F32))
        .collect();
    Tensor::cat(scalars, 0).into_data().iter::<f32>().collect()
}

/// Where a run reads and writes, and how it reports.
pub struct RunOptions {
    /// Where the images come from (`--data` or `--dataset`, opened).
    pub data: Source,
    pub out: PathBuf,
    pub device: Device,
    /// Replace the results of an earlier run in `out`.
    pub overwrite: bool,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
    /// Start the online backbone from these safetensors weights (torchvision names).
    pub init: Option<PathBuf>,
    pub progress: bool,
    /// Set (by Ctrl-C) to finish the current step, checkpoint and return.
    pub stop: Arc<AtomicBool>,
}

/// What a run produced.
pub struct RunResult {
    /// One row per finished epoch, epoch 0 first.
    pub rows: Vec<EpochMetrics>,
    /// The run stopped on request before its last epoch (resumable).
    pub interrupted: bool,
}

/// The data of a run: training images and, when kNN is on, the test split.
pub struct RunData {
    pub train: Arc<Dataset>,
    pub test: Option<Dataset>,
}

pub fn load_data(config: &TrainConfig, source: &Source) -> Result<RunData> {
    let size = config.data.image_size;
    let started = Instant::now();
    let skip_bad = config.data.skip_bad;
    let train = source
        .load("train", size, skip_bad)?
        .balanced_subset(config.data.train_limit, config.train.seed);
    if config.knn.every > 0 && !source.is_labelled() {
        tracing::warn!(
            "{} has no labels: training without the kNN monitor",
            source.describe()
        );
    }
    let test = if config.knn.every > 0 && source.is_labelled() {
        let test = source
            .load("test", size, skip_bad)
            .context("the kNN monitor needs a test split (or pass --knn-every 0)")?;
        if test.classes != train.classes {
            bail!(
                "train and test splits of the {} have different classes",
                source.describe()
            );
        }
        Some(test)
    } else {
        None
    };
    tracing::info!(
        "loaded {} training and {} test images of {} classes from {} in {:.1}s",
        train.len(),
        test.as_ref().map_or(0, Dataset::len),
        train.num_classes(),
        source.describe(),
        started.elapsed().as_secs_f64()
    );
    Ok(RunData {
        train: Arc::new(train),
        test,
    })
}

/// kNN accuracy of the online backbone: train split as memory bank, test split as queries.
pub fn monitor_knn(byol: &Byol, config: &TrainConfig, data: &RunData) -> Option<KnnAccuracy> {
    let test = data.test.as_ref()?;
    let backbone = &byol.online.encoder.backbone;
    let bank = embed(backbone, &data.train);
    let queries = embed(backbone, test);
    Some(knn_accuracy(
        bank,
        &data.train.labels,
        queries,
        &test.labels,
        data.train.num_classes(),
        config.knn.k,
        config.knn.vote,
        config.knn.temperature,
    ))
}

/// Mean over dimensions of the per-dimension std of L2-normalised projections (not yet read
/// back).
pub fn projection_std(projections: Tensor<2>) -> Tensor<1> {
    let z = l2_normalize(projections);
    let centred = z.clone() - z.mean_dim(0);
    centred.square().mean_dim(0).sqrt().mean()
}

fn to_tensor(values: Vec<f32>, batch_size: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(values, [batch_size, 3, size, size]), device)
}

/// Refuses to mix a new run into an earlier one's files unless asked to.
fn prepare_run_dir(out: &Path, overwrite: bool, resume: bool) -> Result<()> {
    if resume {
        if !out.join("checkpoints").join("last").exists()
            && !out.join("checkpoints").join("last.old").exists()
        {
            bail!(
                "--resume: {} has no checkpoint (checkpoints/last)",
                out.display()
            );
        }
        return Ok(());
    }
    if out.join("metrics.jsonl").exists() && !overwrite {
        bail!(
            "{} already holds a run (metrics.jsonl): choose another --out, pass --overwrite, or --resume it",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run directory {}", out.display()))
}

fn progress_bar(show: bool, len: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

/// Keeps the newest `keep` of the `epoch-NNNN` snapshots in `dir`.
fn prune_snapshots(dir: &Path, keep: usize) -> Result<()> {
    let mut snapshots: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("epoch-"))
        })
        .collect();
    snapshots.sort();
    for old in snapshots.iter().rev().skip(keep) {
        std::fs::remove_dir_all(old)
            .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
    }
    Ok(())
}

/// Trains BYOL as `config` says, writing the run into `options.out`.
pub fn train(config: &TrainConfig, options: &RunOptions) -> Result<RunResult> {
    config.validate()?;
    config.train.precision.check(&options.device)?;
    prepare_run_dir(&options.out, options.overwrite, options.resume)?;
    write_atomic(
        &options.out.join("config.toml"),
        config.to_toml().as_bytes(),
    )?;
    let data = load_data(config, &options.data)?;
    let batch_size = config.data.batch_size;
    let accumulate = config.train.accumulate.max(1);
    // Optimizer steps per epoch, each over `accumulate` batches; the batches used per epoch.
    let steps_per_epoch = EpochLoader::batches_per_epoch(data.train.len(), batch_size) / accumulate;
    let batches_per_epoch = steps_per_epoch * accumulate;
    if steps_per_epoch == 0 {
        bail!(
            "--batch-size {batch_size} x --accumulate {accumulate} is larger than the {} training images",
            data.train.len()
        );
    }
    let epochs = config.train.epochs;
    let total_steps = steps_per_epoch * epochs;
    let device = &options.device;
    let metrics_path = options.out.join("metrics.jsonl");
    let checkpoints = options.out.join("checkpoints");
    let last = checkpoints.join("last");

    let (mut byol, mut optimizer, mut state, mut rows) = if options.resume {
        let (byol, state) = checkpoint::load(&last, &config.model, device)?;
        let optimizer = checkpoint::load_optimizer(&last, config.optimizer.build())?;
        let mut rows = read_metrics(&metrics_path)?;
        rows.retain(|r| r.epoch <= state.epoch);
        tracing::info!(
            "resuming after epoch {} (step {}, batch {} of the next epoch)",
            state.epoch,
            state.step,
            state.batch_in_epoch
        );
        (byol, optimizer, state, rows)
    } else {
        let mut byol = config.model.init(device, config.train.seed);
        if let Some(path) = &options.init {
            byol.online.encoder.backbone =
                crate::export::import(byol.online.encoder.backbone, path)?;
            byol.target = config.model.target_copy(&byol.online.encoder, device);
        }
        let baseline = monitor_knn(&byol, config, &data);
        if let Some(acc) = baseline {
            tracing::info!(
                "epoch 0 (before training): kNN top-1 {:.2}% top-5 {:.2}%",
                100.0 * acc.top1,
                100.0 * acc.top5
            );
        }
        let row = EpochMetrics {
            knn_top1: baseline.map(|a| a.top1),
            knn_top5: baseline.map(|a| a.top5),
            peak_rss_mib: peak_rss_mib(),
            ..Default::default()
        };
        write_metrics(&metrics_path, std::slice::from_ref(&row))?;
        (
            byol,
            config.optimizer.build(),
            TrainingState::default(),
            vec![row],
        )
    };
    // A run resumed from a checkpoint of another precision starts its loss scale afresh.
    if config.train.precision.scales_loss() {
        state.loss_scale.get_or_insert_with(LossScale::new);
    } else {
        state.loss_scale = None;
    }
    if state.epoch >= epochs {
        tracing::info!("the run already has its {epochs} epochs (pass --epochs to extend it)");
        return Ok(RunResult {
            rows,
            interrupted: false,
        });
    }

    let knn_due = |epoch: usize| {
        config.knn.every > 0 && (epoch.is_multiple_of(config.knn.every) || epoch == epochs)
    };
    let projection_dim = config.model.projector.output_dim as f64;
    for epoch in state.epoch + 1..=epochs {
        let started = Instant::now();
        let spec = EpochSpec {
            batch_size,
            seed: config.train.seed,
            epoch,
            first_batch: state.batch_in_epoch,
            workers: config.data.workers,
            prefetch: 2,
        };
        let loader = EpochLoader::start(data.train.clone(), config.data.augment.clone(), spec);
        let bar = progress_bar(options.progress, batches_per_epoch, epoch, epochs);
        bar.set_position(state.batch_in_epoch as u64);
        let (mut lr, mut tau, mut timed_batches) = (0.0, 0.0, 0usize);
        let mut accumulated = GradientsAccumulator::new();
        // Whether a batch of the optimizer step being accumulated overflowed fp16, and how
        // many steps this epoch were skipped for that.
        let (mut overflowed, mut skipped_steps) = (false, 0usize);
        let remaining = batches_per_epoch.saturating_sub(state.batch_in_epoch);
        for batch in loader.take(remaining) {
            // The other workers spin through the step, not while the loader is awaited.
            let _spinning = SpinningWorkers::start();
            lr = config
                .optimizer
                .lr_at(batch_size, state.step, steps_per_epoch, total_steps);
            tau = tau_at(
                config.ema.schedule,
                config.ema.tau_base,
                state.step,
                total_steps,
            );
            let TwoViewBatch {
                view1,
                view2,
                batch_size: n,
                size,
            } = batch;
            // Each weight packed once for the forward and backward passes, and BatchNorm
            // statistics from the convolutions' sums: held up to the optimizer step, which
            // then writes the weights in place.
            let step_caches = StepCaches::start();
            let views = [view1, view2].map(|view| to_tensor(view, n, size, device));
            // Each of the `accumulate` batches adds its share of the step's gradient.
            let share = 1.0 / accumulate as f64;
            let StepGradients {
                loss,
                finite,
                projection_std,
            } = step_gradients(
                &byol,
                views,
                config.train.precision,
                state.loss_scale.as_ref(),
                share,
                &mut accumulated,
            );
            if !loss.is_finite() {
                bail!(
                    "the loss became {loss} at epoch {epoch}, step {}: stopping; the last good checkpoint is in {} (try a lower --lr)",
                    state.step,
                    last.display()
                );
            }
            drop(step_caches);
            overflowed |= !finite;
            state.loss_sum += loss;
            state.projection_std_sum += projection_std;
            state.batch_in_epoch += 1;
            if !state.batch_in_epoch.is_multiple_of(accumulate) {
                timed_batches += 1;
                bar.inc(1);
                continue;
            }
            let grads = accumulated.grads();
            // A skipped step still advances the schedules.
            if loss_scale::take_step(state.loss_scale.as_mut(), !overflowed) {
                byol.online = optimizer.step(lr, byol.online, grads);
                byol = byol.update_target(tau, config.ema.average_bn_stats);
            } else {
                skipped_steps += 1;
            }
            overflowed = false;
            state.step += 1;
            timed_batches += 1;
            bar.inc(1);
            let rate = (timed_batches * batch_size) as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!("loss {loss:.4} | {rate:.1} img/s"));
            if options.stop.load(Ordering::Relaxed) && state.batch_in_epoch < batches_per_epoch {
                bar.finish_and_clear();
                checkpoint::save(&last, &byol, &optimizer, &state)?;
                tracing::warn!(
                    "stopped at epoch {epoch}, batch {}/{batches_per_epoch}; continue with `byol train --resume --out {}`",
                    state.batch_in_epoch,
                    options.out.display()
                );
                return Ok(RunResult {
                    rows,
                    interrupted: true,
                });
            }
        }
        bar.finish_and_clear();
        let epoch_seconds = started.elapsed().as_secs_f64();
        let knn = if knn_due(epoch) {
            monitor_knn(&byol, config, &data)
        } else {
            None
        };
        let std = state.projection_std_sum / batches_per_epoch as f64;
        let collapsed = std * projection_dim.sqrt() < config.train.collapse_threshold;
        state.low_std_epochs = if collapsed {
            state.low_std_epochs + 1
        } else {
            0
        };
        let row = EpochMetrics {
            epoch,
            step: state.step,
            loss: Some(state.loss_sum / batches_per_epoch as f64),
            lr: Some(lr),
            tau: Some(tau),
            knn_top1: knn.map(|a| a.top1),
            knn_top5: knn.map(|a| a.top5),
            images_per_sec: Some((timed_batches * batch_size) as f64 / epoch_seconds),
            epoch_seconds: Some(epoch_seconds),
            projection_std: Some(std),
            peak_rss_mib: peak_rss_mib(),
        };
        tracing::info!(
            "epoch {epoch}/{epochs}: loss {:.4}, projection std x sqrt(d) {:.3}, {:.1} img/s, {:.0}s{}{}",
            row.loss.unwrap_or(f64::NAN),
            std * projection_dim.sqrt(),
            row.images_per_sec.unwrap_or(0.0),
            epoch_seconds,
            row.peak_rss_mib
                .map(|m| format!(", peak RSS {m:.0} MiB"))
                .unwrap_or_default(),
            knn.map(|a| format!(
                ", kNN top-1 {:.2}% top-5 {:.2}%",
                100.0 * a.top1,
                100.0 * a.top5
            ))
            .unwrap_or_default()
        );
        rows.push(row);
        if let Some(scale) = &state.loss_scale {
            tracing::info!(
                "fp16 loss scale {}, {skipped_steps} step(s) of this epoch skipped for overflow",
                scale.scale
            );
        }
        state = TrainingState {
            epoch,
            step: state.step,
            low_std_epochs: state.low_std_epochs,
            loss_scale: state.loss_scale,
            ..Default::default()
        };
        checkpoint::save(&last, &byol, &optimizer, &state)?;
        if config.train.checkpoint_every > 0 && epoch.is_multiple_of(config.train.checkpoint_every)
        {
            checkpoint::save(
                &checkpoints.join(format!("epoch-{epoch:04}")),
                &byol,
                &optimizer,
                &state,
            )?;
            prune_snapshots(&checkpoints, config.train.keep_checkpoints)?;
        }
        write_metrics(&metrics_path, &rows)?;
        if let Err(e) = plot_all(&options.out, &rows) {
            tracing::warn!("could not draw the plots: {e:#}");
        }
        if config.train.collapse_patience > 0
            && state.low_std_epochs >= config.train.collapse_patience
        {
            bail!(
                "representation collapse: the online projections' spread (std x sqrt(dim) = {:.4}) stayed under {} for {} epochs; \
                 stopping (metrics and checkpoint kept in {}). Check the predictor, the EMA rate and the learning rate",
                std * projection_dim.sqrt(),
                config.train.collapse_threshold,
                state.low_std_epochs,
                options.out.display()
            );
        }
    }
    Ok(RunResult {
        rows,
        interrupted: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn projection_std_is_zero_for_one_point_and_about_one_over_sqrt_dim_when_spread() {
        let device = Device::default();
        let same = Tensor::<2>::ones([64, 16], &device);
        assert!(projection_std(same).into_scalar::<f32>() < 1e-6);
        let spread = Tensor::<2>::random([4096, 16], Distribution::Normal(0.0, 1.0), &device);
        let std = projection_std(spread).into_scalar::<f32>() as f64 * 16f64.sqrt();
        assert!((std - 1.0).abs() < 0.1, "{std}");
    }
}
