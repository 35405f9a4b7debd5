//! `byol bench`: throughput of the training step, of inference and of the data pipeline, and
//! (on flex) each convolution of the backbone alone.
//!
//! Warm-up steps first, then the median and spread of timed steps. Numbers from these noisy
//! machines are only comparable within one run: compare against a reference measured in the
//! same process or script.

use crate::config::TrainConfig;
use crate::data::augment::AugmentConfig;
use crate::data::folder::Dataset;
use crate::data::loader::{epoch_order, two_view_batch};
use crate::io::peak_rss_mib;
use crate::model::StepCaches;
use crate::optim::loss_scale::{self, LossScale};
use crate::threads::SpinningWorkers;
use crate::train::step_gradients;
use burn::module::Module;
use burn::optim::GradientsAccumulator;
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
    /// Where the precision ran otherwise than it says (`Precision::notice`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<&'static str>,
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
            notice: None,
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
        // As `byol train` holds them, up to the optimizer step.
        let step_caches = StepCaches::start();
        let mut grads = GradientsAccumulator::new();
        let step = step_gradients(
            &current,
            views.clone(),
            config.train.precision,
            scale.as_ref(),
            1.0,
            &mut grads,
        );
        drop(step_caches);
        let next = if step.loss.is_finite() && loss_scale::take_step(scale.as_mut(), step.finite) {
            crate::model::byol::Byol {
                online: optimizer.step(lr, current.online, grads.grads()),
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

/// One distinct convolution of the backbone, timed alone ([`bench_conv`]).
#[derive(Debug, Serialize)]
pub struct ConvTiming {
    /// NCHW input and `[C_out, C_in, kh, kw]` weight.
    pub input: [usize; 4],
    pub weight: [usize; 4],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    /// Layers of the backbone with this convolution.
    pub layers: usize,
    /// Multiply-adds times two, of one call.
    pub mflop: f64,
    pub forward_ms: f64,
    pub weight_grad_ms: f64,
    pub input_grad_ms: f64,
    /// Whether its products ran in bf16 (on AMX tiles).
    pub bf16: bool,
}

/// Each distinct convolution of the backbone (as one eval-mode forward of a batch meets it)
/// timed alone on flex: forward, weight gradient and input gradient, medians of `steps` calls
/// after `warmup`, each on random tensors of its shapes. Under the caller's precision scope.
/// The fused BatchNorm + convolution pairs run these same products, with the norm applied as
/// they copy their input.
#[cfg(feature = "flex")]
pub fn bench_conv(config: &TrainConfig, warmup: usize, steps: usize) -> Vec<ConvTiming> {
    use crate::model::fused::conv::{self, GemmConvOps};
    use burn::backend::ops::conv::calculate_conv_output_size_asymmetric;
    type Ops = burn::backend::Dispatch;
    let device = Device::flex();
    let (batch, size) = (config.data.batch_size, config.data.image_size);
    let backbone = config
        .model
        .init(&device, config.train.seed)
        .online
        .encoder
        .backbone
        .valid();
    let images = random_views(batch, size, &device);
    let (_, recorded) = conv::recording(|| backbone.forward(images).into_data());
    let mut distinct: Vec<(conv::Recorded, usize)> = Vec::new();
    for call in recorded {
        match distinct.iter_mut().find(|(seen, _)| *seen == call) {
            Some((_, layers)) => *layers += 1,
            None => distinct.push((call, 1)),
        }
    }
    let milliseconds = |work: &mut dyn FnMut()| time(warmup, steps, work).median_s * 1e3;
    // The pool's workers spin between the timed calls, as they do through a training step.
    let _spinning = SpinningWorkers::start();
    distinct
        .into_iter()
        .map(|(call, layers)| {
            let conv::Recorded {
                input,
                weight,
                options,
                bf16,
            } = call;
            let [n, _, h, w] = input;
            let [cout, cin, kh, kw] = weight;
            let [ho, wo] = [0, 1].map(|axis| {
                calculate_conv_output_size_asymmetric(
                    [kh, kw][axis],
                    options.stride[axis],
                    options.padding[axis],
                    options.dilation[axis],
                    [h, w][axis],
                )
            });
            let normal = Distribution::Normal(0.0, 1.0);
            let x = Tensor::<4>::random(input, normal, &device).into_dispatch();
            let kernel = Tensor::<4>::random(weight, normal, &device).into_dispatch();
            let dy = Tensor::<4>::random([n, cout, ho, wo], normal, &device).into_dispatch();
            let forward_ms = milliseconds(&mut || {
                let _ = Ops::gemm_conv2d(x.clone(), kernel.clone(), options.clone(), bf16);
            });
            let weight_grad_ms = milliseconds(&mut || {
                let _ = Ops::gemm_conv2d_weight_grad(
                    x.clone(),
                    dy.clone(),
                    [kh, kw],
                    options.clone(),
                    bf16,
                );
            });
            let input_grad_ms = milliseconds(&mut || {
                let _ = Ops::gemm_conv2d_input_grad(
                    dy.clone(),
                    kernel.clone(),
                    input,
                    options.clone(),
                    bf16,
                );
            });
            ConvTiming {
                input,
                weight,
                stride: options.stride,
                padding: options.padding_begin(),
                layers,
                mflop: 2.0 * (n * cout * ho * wo * cin * kh * kw) as f64 / 1e6,
                forward_ms,
                weight_grad_ms,
                input_grad_ms,
                bf16,
            }
        })
        .collect()
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

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::model::resnet::Architecture;

    /// `bench conv` meets every convolution of the backbone once per layer (ResNet-18: the
    /// stem, 16 in the blocks, 3 downsamples; ResNet-50: 53), and times each.
    #[test]
    fn bench_conv_times_each_convolution_of_the_backbone() {
        for (architecture, convolutions) in
            [(Architecture::Resnet18, 20), (Architecture::Resnet50, 53)]
        {
            let mut config = TrainConfig::preset("seed").unwrap();
            config.model.backbone.architecture = architecture;
            config.model.backbone.width = 0.125;
            config.data.batch_size = 2;
            config.data.image_size = 8;
            let timings = bench_conv(&config, 0, 1);
            let layers: usize = timings.iter().map(|t| t.layers).sum();
            assert_eq!(layers, convolutions, "{architecture:?}");
            assert_eq!(timings[0].input, [2, 3, 8, 8], "the stem comes first");
            for t in &timings {
                assert!(t.mflop > 0.0 && t.forward_ms > 0.0, "{t:?}");
                assert!(t.weight_grad_ms > 0.0 && t.input_grad_ms > 0.0, "{t:?}");
            }
        }
    }
}
