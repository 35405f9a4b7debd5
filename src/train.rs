//! The BYOL training loop: augment, forward both networks, step the online one, move the
//! target by EMA, and measure with kNN.

use crate::checkpoint::{self, TrainingState};
use crate::config::TrainConfig;
use crate::data::archive::resolve_data_dir;
use crate::data::folder::{Dataset, find_root, load_split};
use crate::data::loader::{EpochLoader, TwoViewBatch};
use crate::ema::tau_at;
use crate::eval::embed;
use crate::eval::knn::{KnnAccuracy, knn_accuracy};
use crate::io::{peak_rss_mib, write_atomic};
use crate::loss::l2_normalize;
use crate::model::byol::Byol;
use crate::report::{EpochMetrics, plot_knn, plot_loss, write_metrics};
use anyhow::{Context, Result, bail};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Where a run reads and writes, and how it reports.
pub struct RunOptions {
    /// An image folder or a `.tar.gz` of one.
    pub data: PathBuf,
    pub out: PathBuf,
    pub device: Device,
    /// Replace the results of an earlier run in `out`.
    pub overwrite: bool,
    pub progress: bool,
}

/// The data of a run: training images and, when kNN is on, the test split.
pub struct RunData {
    pub train: Arc<Dataset>,
    pub test: Option<Dataset>,
}

pub fn load_data(config: &TrainConfig, data: &Path) -> Result<RunData> {
    let root = find_root(&resolve_data_dir(data)?)?;
    let size = config.data.image_size;
    let started = Instant::now();
    let train = load_split(&root, "train", size)?
        .balanced_subset(config.data.train_limit, config.train.seed);
    let test = if config.knn.every > 0 {
        let test = load_split(&root, "test", size)
            .context("the kNN monitor needs a test split (or pass --knn-every 0)")?;
        if test.classes != train.classes {
            bail!(
                "train and test splits of {} have different class folders",
                root.display()
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
        root.display(),
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

/// Mean over dimensions of the per-dimension std of L2-normalised projections.
pub fn projection_std(projections: Tensor<2>) -> f64 {
    let z = l2_normalize(projections);
    let centred = z.clone() - z.mean_dim(0);
    centred
        .square()
        .mean_dim(0)
        .sqrt()
        .mean()
        .into_scalar::<f32>() as f64
}

fn to_tensor(values: Vec<f32>, batch_size: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(values, [batch_size, 3, size, size]), device)
}

/// Refuses to mix a new run into an earlier one's files unless asked to.
fn prepare_run_dir(out: &Path, overwrite: bool) -> Result<()> {
    if out.join("metrics.jsonl").exists() && !overwrite {
        bail!(
            "{} already holds a run (metrics.jsonl): choose another --out or pass --overwrite",
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

/// Trains BYOL as `config` says and returns the per-epoch metrics (also in `out/metrics.jsonl`).
pub fn train(config: &TrainConfig, options: &RunOptions) -> Result<Vec<EpochMetrics>> {
    config.validate()?;
    prepare_run_dir(&options.out, options.overwrite)?;
    write_atomic(
        &options.out.join("config.toml"),
        config.to_toml().as_bytes(),
    )?;
    let data = load_data(config, &options.data)?;
    let batch_size = config.data.batch_size;
    let steps_per_epoch = EpochLoader::batches_per_epoch(data.train.len(), batch_size);
    if steps_per_epoch == 0 {
        bail!(
            "--batch-size {batch_size} is larger than the {} training images",
            data.train.len()
        );
    }
    let total_steps = steps_per_epoch * config.train.epochs;

    let device = &options.device;
    device.seed(config.train.seed);
    let mut byol = config.model.init(device);
    let mut optimizer = config.optimizer.build();
    let metrics_path = options.out.join("metrics.jsonl");
    let checkpoint_dir = options.out.join("checkpoints").join("last");

    let knn_due = |epoch: usize| {
        config.knn.every > 0 && (epoch % config.knn.every == 0 || epoch == config.train.epochs)
    };
    let mut rows = Vec::with_capacity(config.train.epochs + 1);
    let baseline = monitor_knn(&byol, config, &data);
    if let Some(acc) = baseline {
        tracing::info!(
            "epoch 0 (random weights): kNN top-1 {:.2}% top-5 {:.2}%",
            100.0 * acc.top1,
            100.0 * acc.top5
        );
    }
    rows.push(EpochMetrics {
        knn_top1: baseline.map(|a| a.top1),
        knn_top5: baseline.map(|a| a.top5),
        peak_rss_mib: peak_rss_mib(),
        ..Default::default()
    });
    write_metrics(&metrics_path, &rows)?;

    let mut step = 0;
    for epoch in 1..=config.train.epochs {
        let started = Instant::now();
        let loader = EpochLoader::start(
            data.train.clone(),
            config.data.augment.clone(),
            batch_size,
            config.train.seed,
            epoch,
            config.data.workers,
            2,
        );
        let bar = progress_bar(options.progress, loader.batches, epoch, config.train.epochs);
        let (mut loss_sum, mut lr, mut tau, mut last_projection) = (0.0, 0.0, 0.0, None);
        for batch in loader {
            lr = config
                .optimizer
                .lr_at(batch_size, step, steps_per_epoch, total_steps);
            tau = tau_at(config.ema.schedule, config.ema.tau_base, step, total_steps);
            let TwoViewBatch {
                view1,
                view2,
                batch_size: n,
                size,
            } = batch;
            let view1 = to_tensor(view1, n, size, device);
            let view2 = to_tensor(view2, n, size, device);
            let output = byol.forward(view1, view2);
            let loss = output.loss.clone().into_scalar::<f32>() as f64;
            if !loss.is_finite() {
                bail!(
                    "the loss became {loss} at epoch {epoch}, step {step}: stopping (the last good checkpoint is in {}); try a lower learning rate",
                    checkpoint_dir.display()
                );
            }
            let grads = GradientsParams::from_grads(output.loss.backward(), &byol.online);
            byol.online = optimizer.step(lr, byol.online, grads);
            byol = byol.update_target(tau, config.ema.average_bn_stats);
            last_projection = Some(output.online_projection);
            loss_sum += loss;
            step += 1;
            bar.inc(1);
            let seconds = started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {loss:.4} | {:.1} img/s",
                bar.position() as f64 * batch_size as f64 / seconds
            ));
        }
        bar.finish_and_clear();
        let epoch_seconds = started.elapsed().as_secs_f64();
        let knn = if knn_due(epoch) {
            monitor_knn(&byol, config, &data)
        } else {
            None
        };
        let row = EpochMetrics {
            epoch,
            step,
            loss: Some(loss_sum / steps_per_epoch as f64),
            lr: Some(lr),
            tau: Some(tau),
            knn_top1: knn.map(|a| a.top1),
            knn_top5: knn.map(|a| a.top5),
            images_per_sec: Some((steps_per_epoch * batch_size) as f64 / epoch_seconds),
            epoch_seconds: Some(epoch_seconds),
            projection_std: last_projection.map(projection_std),
            peak_rss_mib: peak_rss_mib(),
        };
        tracing::info!(
            "epoch {epoch}/{}: loss {:.4}, {:.1} img/s, {:.0}s{}",
            config.train.epochs,
            row.loss.unwrap_or(f64::NAN),
            row.images_per_sec.unwrap_or(0.0),
            epoch_seconds,
            knn.map(|a| format!(
                ", kNN top-1 {:.2}% top-5 {:.2}%",
                100.0 * a.top1,
                100.0 * a.top5
            ))
            .unwrap_or_default()
        );
        rows.push(row);
        checkpoint::save(&checkpoint_dir, &byol, &TrainingState { epoch, step })?;
        write_metrics(&metrics_path, &rows)?;
        if let Err(e) = plot_knn(&options.out.join("knn.png"), &rows)
            .and_then(|_| plot_loss(&options.out.join("loss.png"), &rows))
        {
            tracing::warn!("could not draw the plots: {e:#}");
        }
    }
    Ok(rows)
}
