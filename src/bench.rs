//! `byol bench`: throughput of the training step, of inference and of the data pipeline.
//!
//! Warm-up steps first, then the median and spread of timed steps. Numbers from these noisy
//! machines are only comparable within one run: compare against a reference measured in the
//! same process or script.

use crate::config::TrainConfig;
use crate::data::augment::AugmentConfig;
use crate::data::folder::Dataset;
use crate::data::loader::{epoch_order, two_view_batch};
use crate::io::peak_rss_mib;
use crate::optim::loss_scale::{self, LossScale};
use crate::threads::SpinningWorkers;
use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// Timing summary of repeated runs of one piece of work.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub steps: usize,
}

/// Runs `work` `warmup` times untimed, then `steps` times timed.
pub fn time(warmup: usize, steps: usize, mut work: impl FnMut()) -> Timing {
    for _ in 0..warmup {
        work();
    }
    let mut seconds: Vec<f64> = (0..steps.max(1))
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed().as_secs_f64()
        })
        .collect();
    seconds.sort_by(f64::total_cmp);
    Timing {
        median_s: seconds[seconds.len() / 2],
        min_s: seconds[0],
        max_s: seconds[seconds.len() - 1],
        steps: seconds.len(),
    }
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub bench: &'static str,
    pub batch_size: usize,
    pub image_size: usize,
    pub images_per_sec: f64,
    pub gflops_per_sec: Option<f64>,
    pub timing: Timing,
    pub peak_rss_mib: Option<f64>,
    pub threads: usize,
    /// Float type of the measured tensors (`f32` unless `--precision` said otherwise).
    pub precision: &'static str,
}

impl BenchReport {
    /// Throughput from the median step of `batch` images, and GFLOP/s when the FLOPs per image
    /// are known.
    fn new(
        bench: &'static str,
        batch: usize,
        image_size: usize,
        timing: Timing,
        flops_per_image: Option<f64>,
        threads: usize,
    ) -> Self {
        let images_per_sec = batch as f64 / timing.median_s;
        BenchReport {
            bench,
            batch_size: batch,
            image_size,
            images_per_sec,
            gflops_per_sec: flops_per_image.map(|f| images_per_sec * f / 1e9),
            timing,
            peak_rss_mib: peak_rss_mib(),
            threads,
            precision: "f32",
        }
    }
}

fn random_views(batch: usize, size: usize, device: &Device) -> Tensor<4> {
    Tensor::random(
        [batch, 3, size, size],
        Distribution::Normal(0.0, 1.0),
        device,
    )
}

/// The full BYOL step (online forward and backward on both views, target forward on both,
/// optimizer step, EMA) on random images.
pub fn bench_train(
    config: &TrainConfig,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> BenchReport {
    let (batch, size) = (config.data.batch_size, config.data.image_size);
    let mut byol = Some(config.model.init(device, config.train.seed));
    let mut optimizer = config.optimizer.build();
    let lr = config.optimizer.base_lr(batch);
    // Made once: drawing them (burn's random normal, on one thread) took 2% of a width-0.25
    // step, and the step is what is measured (`bench/pytorch_byol.py` does the same).
    let views = [0, 1].map(|_| random_views(batch, size, device));
    let mut scale = config.train.precision.scales_loss().then(LossScale::new);
    let timing = time(warmup, steps, || {
        // As `byol train` holds it for each step.
        let _spinning = SpinningWorkers::start();
        let current = byol.take().expect("model present");
        let output = current.forward(views[0].clone(), views[1].clone());
        let (grads, finite) = loss_scale::backward(output.loss, &current.online, scale.as_ref());
        let next = if loss_scale::take_step(scale.as_mut(), finite) {
            crate::model::byol::Byol {
                online: optimizer.step(lr, current.online, grads),
                target: current.target,
            }
            .update_target(config.ema.tau_base, false)
        } else {
            current
        };
        // Wait for the step to finish (asynchronous backends).
        let _ = next.target.projector.linear2.weight.val().into_data();
        byol = Some(next);
    });
    let flops = config.model.step_flops(size);
    BenchReport::new(
        "train",
        batch,
        size,
        timing,
        Some(flops),
        rayon::current_num_threads(),
    )
}

/// Backbone forward in eval mode (what kNN, embedding and deployment run).
pub fn bench_infer(
    config: &TrainConfig,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> BenchReport {
    let (batch, size) = (config.data.batch_size, config.data.image_size);
    let backbone = config
        .model
        .init(device, config.train.seed)
        .online
        .encoder
        .backbone
        .valid();
    let inference = device.clone().without_autodiff();
    let images = random_views(batch, size, &inference);
    let timing = time(warmup, steps, || {
        let features = backbone.forward(images.clone());
        let _ = features.into_data();
    });
    let flops = config.model.backbone.forward_flops(size);
    BenchReport::new(
        "infer",
        batch,
        size,
        timing,
        Some(flops),
        rayon::current_num_threads(),
    )
}

/// Two augmented views per image, normalised into batch buffers, on `threads` threads
/// (0: all cores), from `dataset` or random images of `config`'s size.
pub fn bench_data(
    config: &TrainConfig,
    dataset: Option<&Dataset>,
    threads: usize,
    warmup: usize,
    steps: usize,
) -> BenchReport {
    let (batch, size) = (config.data.batch_size, config.data.image_size);
    let synthetic;
    let dataset = match dataset {
        Some(d) => d,
        None => {
            synthetic = random_dataset(batch * 4, size);
            &synthetic
        }
    };
    let augment: &AugmentConfig = &config.data.augment;
    let order = epoch_order(dataset.len(), config.train.seed, 1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    let batches = dataset.len() / batch;
    let mut step = 0;
    let timing = pool.install(|| {
        time(warmup, steps, || {
            let start = (step % batches.max(1)) * batch;
            let _ = two_view_batch(
                dataset,
                augment,
                &order,
                start,
                batch.min(dataset.len()),
                config.train.seed,
                1,
            );
            step += 1;
        })
    });
    BenchReport::new(
        "data",
        batch,
        dataset.size,
        timing,
        None,
        pool.current_num_threads(),
    )
}

fn random_dataset(len: usize, size: usize) -> Dataset {
    let mut pixels = vec![0u8; len * size * size * 3];
    rand_chacha::ChaCha8Rng::seed_from_u64(0).fill_bytes(&mut pixels);
    Dataset {
        classes: vec!["random".into()],
        size,
        pixels,
        labels: vec![0; len],
        paths: vec![Default::default(); len],
    }
}
