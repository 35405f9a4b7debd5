//! The `byol` command line.

use crate::checkpoint::open_run;
use crate::config::{PRESETS, TrainConfig};
use crate::data::download::KnownDataset;
use crate::data::{Format, Source};
use crate::device::Backend;
use crate::eval::knn::Vote;
use crate::eval::{Features, knn_cross_validated, knn_train_test};
use crate::model::precision::{Precision, autocast};
use crate::model::resnet::{Architecture, Stem};
use crate::optim::OptimizerKind;
use crate::train::{RunOptions, train};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser, Debug)]
#[command(
    name = "byol",
    version,
    about = "BYOL self-supervised training of ResNets, in Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pretrain a ResNet with BYOL on an image folder, monitoring kNN accuracy.
    Train(Box<TrainArgs>),
    /// Evaluate a trained encoder.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Inspect the built-in presets.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure throughput: the training step, inference, or the data pipeline.
    Bench(BenchArgs),
    /// Look at the data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Write a checkpoint's weights as safetensors under torchvision's ResNet names.
    Export(ExportArgs),
    /// Re-draw a run's plots (kNN, loss, lr, tau) and print its per-epoch table.
    Report {
        /// Run directory (with metrics.jsonl).
        run: PathBuf,
    },
    /// Write a dataset's features as .npy (with labels .npy and a CSV of file paths).
    Embed(EmbedArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportPart {
    /// The online backbone (what is usually shipped).
    Backbone,
    /// Online backbone, projector and predictor.
    Online,
    /// Target backbone and projector.
    Target,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run directory, or a checkpoint directory inside one.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "backbone")]
    pub part: ExportPart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Test,
    /// Train then test.
    All,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// A run directory, or a checkpoint directory inside one.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataFlags,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// Features file (.npy); labels go to `<stem>_labels.npy`, paths to `<stem>_paths.csv`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "backbone")]
    pub features: Features,
    #[arg(long, value_enum)]
    pub device: Option<Backend>,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Download the official binary archive, check its MD5 and unpack it (resumes a broken
    /// transfer; an archive already in --dir is used without the network).
    Download {
        #[arg(value_enum)]
        dataset: KnownDataset,
        /// Folder to put it in (default: $BYOL_DATA, else ~/.cache/byol).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A mirror of the archive instead of the official address.
        #[arg(long)]
        url: Option<String>,
        /// The archive's MD5 when the mirror's differs from the published one.
        #[arg(long)]
        md5: Option<String>,
    },
    /// A PNG grid of original / view 1 / view 2 for a few training images.
    Preview {
        #[command(flatten)]
        data: DataFlags,
        #[arg(long, default_value = "preview.png")]
        out: PathBuf,
        /// Recipe whose augmentations are shown.
        #[arg(long, default_value = "seed")]
        preset: String,
        #[arg(long, default_value_t = 8)]
        count: usize,
        /// Pixel magnification.
        #[arg(long, default_value_t = 4)]
        zoom: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKind {
    /// The whole BYOL step on random images.
    Train,
    /// Backbone forward in eval mode.
    Infer,
    /// Decoding-free augmentation of two views per image.
    Data,
    /// Each distinct convolution of the backbone alone on flex: forward, weight gradient and
    /// input gradient (what a training step is made of, layer by layer).
    Conv,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub kind: BenchKind,
    /// Recipe whose model and augmentations are measured.
    #[arg(long, default_value = "seed")]
    pub preset: String,
    #[command(flatten)]
    pub model: ModelFlags,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum)]
    pub device: Option<Backend>,
    /// `train`, `infer` and `conv`: float type of convolutions and linear layers (bf16, f16:
    /// mixed precision, as `train --precision`).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// `train` and `infer`: burn's own BatchNorm, convolution, optimizer and EMA steps instead
    /// of byol's flex ones (the before of a before/after).
    #[arg(long)]
    pub burn_ops: bool,
    /// `data` only: augment these images (any `--data` layout) instead of random ones.
    #[arg(long)]
    pub data: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// kNN accuracy of a checkpoint's features (cosine similarity, top-1 and top-5).
    Knn(KnnArgs),
    /// Linear probe: softmax regression on frozen backbone features, test top-1 and top-5.
    Linear(LinearArgs),
}

#[derive(Args, Debug)]
pub struct LinearArgs {
    /// A run directory, or a checkpoint directory inside one.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataFlags,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Weight decays to pick from on a held-out tenth of the train split.
    #[arg(long, value_delimiter = ',', default_value = "0,1e-5,1e-4,1e-3")]
    pub weight_decays: Vec<f64>,
    #[arg(long, value_enum, default_value = "backbone")]
    pub features: Features,
    #[arg(long, value_enum)]
    pub device: Option<Backend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KnnProtocol {
    /// Train split as memory bank, test split as queries.
    Split,
    /// The article's: stratified 5-fold cross-validation on the test split.
    Cv5,
}

#[derive(Args, Debug)]
pub struct KnnArgs {
    /// A run directory, or a checkpoint directory inside one.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataFlags,
    /// Neighbours; a list evaluates every k from one embedding pass.
    #[arg(long, value_delimiter = ',', default_value = "200")]
    pub k: Vec<usize>,
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f64,
    #[arg(long, value_enum, default_value = "weighted")]
    pub vote: Vote,
    #[arg(long, value_enum, default_value = "backbone")]
    pub features: Features,
    #[arg(long, value_enum, default_value = "split")]
    pub protocol: KnnProtocol,
    #[arg(long, value_enum)]
    pub device: Option<Backend>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print a preset as TOML (a starting point for --config).
    Show {
        /// Preset name.
        preset: String,
    },
    /// List the presets.
    List,
}

/// Where the images come from, shared by every command that reads a dataset.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("source").args(["data", "dataset"]).required(true)))]
pub struct DataFlags {
    /// Image folder `DIR/{train,test}/<class>/*.jpg`, CIFAR-10/100 binaries, an unlabeled image
    /// folder, or a `.tar.gz` of one (unpacked once into $BYOL_DATA, else ~/.cache/byol).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A dataset by name, downloaded into $BYOL_DATA (else ~/.cache/byol) when absent.
    #[arg(long, value_enum)]
    pub dataset: Option<KnownDataset>,
    /// Data layout, instead of detecting it.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
}

impl DataFlags {
    pub fn source(&self) -> Result<Source> {
        match (&self.data, self.dataset) {
            (Some(path), _) => Source::open_as(path, self.format),
            (None, Some(dataset)) => {
                let dir = crate::data::download::fetch(
                    &dataset.remote(),
                    &crate::data::archive::cache_dir(),
                    std::io::stderr().is_terminal(),
                )?;
                Source::open_as(&dir, self.format)
            }
            (None, None) => anyhow::bail!("pass --data DIR or --dataset NAME"),
        }
    }
}

/// Model and batch shape flags shared by `train` and `bench`.
#[derive(Args, Debug)]
pub struct ModelFlags {
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, value_enum)]
    pub backbone: Option<Architecture>,
    #[arg(long, value_enum)]
    pub stem: Option<Stem>,
    /// Channel multiplier of the backbone (0.25 for quick CPU runs).
    #[arg(long)]
    pub width: Option<f64>,
    /// Images are resized to this square side.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Drop the predictor (the paper's ablation; collapses unless the target moves slowly).
    #[arg(long)]
    pub no_predictor: bool,
}

/// Overwrites `field` with the flag's value when the flag was given.
fn set<T: Clone>(field: &mut T, flag: &Option<T>) {
    if let Some(v) = flag {
        *field = v.clone();
    }
}

impl ModelFlags {
    pub fn apply(&self, c: &mut TrainConfig) {
        set(&mut c.data.batch_size, &self.batch_size);
        set(&mut c.model.backbone.architecture, &self.backbone);
        set(&mut c.model.backbone.stem, &self.stem);
        set(&mut c.model.backbone.width, &self.width);
        set(&mut c.data.image_size, &self.image_size);
        c.model.use_predictor &= !self.no_predictor;
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataFlags,
    /// Run directory: config.toml, metrics.jsonl, knn.png, loss.png, checkpoints/last.
    #[arg(long, default_value = "runs/byol")]
    pub out: PathBuf,
    /// Replace an earlier run's results in --out.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Start the online backbone from these weights (safetensors under torchvision's names,
    /// e.g. from `byol export` or a converted torchvision ResNet).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint, with its config.toml (only
    /// --epochs may change, to extend it).
    #[arg(long)]
    pub resume: bool,
    /// Built-in recipe to start from (see `byol config list`).
    #[arg(long, default_value = "seed")]
    pub preset: String,
    /// TOML file replacing the preset (same layout as `byol config show seed`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Backend to run on (among those compiled in).
    #[arg(long, value_enum)]
    pub device: Option<Backend>,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Sum the gradients of N batches into each optimizer step (effective batch N x batch size).
    #[arg(long)]
    pub accumulate: Option<usize>,
    /// Mixed precision: bf16 (or f16) convolutions and linear layers, f32 weights, BatchNorm,
    /// loss and EMA (bf16 pays on flex with Intel AMX; f16, with a dynamic loss scale, is for
    /// GPUs, where burn's wgpu has no bf16 arithmetic).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    #[command(flatten)]
    pub model: ModelFlags,
    /// Train on a class-balanced subset of this many images.
    #[arg(long)]
    pub train_limit: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Base learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Base EMA rate of the target network.
    #[arg(long)]
    pub tau: Option<f64>,
    /// kNN monitor every N epochs (and before training); 0 turns it off.
    #[arg(long)]
    pub knn_every: Option<usize>,
    #[arg(long)]
    pub knn_k: Option<usize>,
    #[arg(long, value_enum)]
    pub knn_vote: Option<Vote>,
    #[arg(long)]
    pub knn_temperature: Option<f64>,
    /// Augmentation threads (0: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Leave undecodable images out (counted in a warning) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// Preset or config file, then the flags on top.
    pub fn resolve_config(&self) -> Result<TrainConfig> {
        if self.resume {
            let mut c = TrainConfig::load(&self.out.join("config.toml")).with_context(|| {
                format!("--resume: {} is not a run directory", self.out.display())
            })?;
            if let Some(epochs) = self.epochs {
                c.train.epochs = epochs;
            }
            c.validate()?;
            return Ok(c);
        }
        let mut c = match &self.config {
            Some(path) => TrainConfig::load(path)?,
            None => TrainConfig::preset(&self.preset)?,
        };
        set(&mut c.train.epochs, &self.epochs);
        set(&mut c.train.accumulate, &self.accumulate);
        set(&mut c.train.precision, &self.precision);
        self.model.apply(&mut c);
        set(&mut c.data.train_limit, &self.train_limit);
        set(&mut c.train.seed, &self.seed);
        set(&mut c.optimizer.kind, &self.optimizer);
        set(&mut c.optimizer.lr, &self.lr);
        set(&mut c.ema.tau_base, &self.tau);
        set(&mut c.knn.every, &self.knn_every);
        set(&mut c.knn.k, &self.knn_k);
        set(&mut c.knn.vote, &self.knn_vote);
        set(&mut c.knn.temperature, &self.knn_temperature);
        set(&mut c.data.workers, &self.workers);
        c.data.skip_bad |= self.skip_bad;
        c.validate()?;
        Ok(c)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => {
            let config = args.resolve_config()?;
            let backend = args.device.unwrap_or_else(Backend::default_compiled);
            let options = RunOptions {
                data: args.data.source()?,
                out: args.out.clone(),
                device: backend.training_device()?,
                overwrite: args.overwrite,
                resume: args.resume,
                init: args.init.clone(),
                progress: !args.quiet && std::io::stderr().is_terminal(),
                stop: Arc::new(AtomicBool::new(false)),
            };
            let stop = options.stop.clone();
            // First Ctrl-C: finish the step, checkpoint, exit. A second one kills.
            ctrlc::set_handler(move || {
                if stop.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
                eprintln!("\ninterrupt: stopping after this step (Ctrl-C again to kill)");
            })
            .context("cannot install the Ctrl-C handler")?;
            tracing::info!(
                "training on {backend:?}; run directory {}",
                options.out.display()
            );
            let result = train(&config, &options)?;
            if result.interrupted {
                std::process::exit(130);
            }
            let last = result.rows.last();
            let last_knn = result.rows.iter().rev().find(|r| r.knn_top1.is_some());
            println!(
                "{}",
                serde_json::json!({
                    "run": options.out, "epochs": config.train.epochs,
                    "epoch": last.map(|r| r.epoch), "loss": last.and_then(|r| r.loss),
                    "knn_epoch": last_knn.map(|r| r.epoch),
                    "knn_top1": last_knn.and_then(|r| r.knn_top1), "knn_top5": last_knn.and_then(|r| r.knn_top5),
                })
            );
            Ok(())
        }
        Command::Eval(EvalCommand::Knn(args)) => eval_knn(&args),
        Command::Eval(EvalCommand::Linear(args)) => eval_linear(&args),
        Command::Bench(args) => bench(&args),
        Command::Export(args) => export(&args),
        Command::Report { run } => {
            let rows = crate::report::read_metrics(&run.join("metrics.jsonl"))?;
            crate::report::plot_all(&run, &rows)?;
            eprint!("{}", crate::report::summary_table(&rows));
            let best = rows.iter().filter(|r| r.knn_top1.is_some()).max_by(|a, b| {
                a.knn_top1
                    .partial_cmp(&b.knn_top1)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let last = rows.last();
            println!(
                "{}",
                serde_json::json!({
                    "run": run, "epochs": last.map(|r| r.epoch), "loss": last.and_then(|r| r.loss),
                    "knn_top1": last.and_then(|r| r.knn_top1), "best_knn_top1": best.and_then(|r| r.knn_top1),
                    "best_epoch": best.map(|r| r.epoch),
                })
            );
            Ok(())
        }
        Command::Embed(args) => embed(&args),
        Command::Data(DataCommand::Download {
            dataset,
            dir,
            url,
            md5,
        }) => {
            let mut remote = dataset.remote();
            set(&mut remote.url, &url);
            set(&mut remote.md5, &md5);
            let dir = dir.unwrap_or_else(crate::data::archive::cache_dir);
            let folder =
                crate::data::download::fetch(&remote, &dir, std::io::stderr().is_terminal())?;
            let source = Source::open_as(&folder, Format::Cifar)?;
            eprintln!("{}", source.describe());
            println!("{}", serde_json::json!({ "dataset": folder }));
            Ok(())
        }
        Command::Data(DataCommand::Preview {
            data,
            out,
            preset,
            count,
            zoom,
            seed,
        }) => {
            let config = TrainConfig::preset(&preset)?;
            let train = data.source()?.load("train", config.data.image_size, true)?;
            let grid = crate::data::preview::preview_grid(
                &train,
                &config.data.augment,
                count,
                zoom.max(1),
                seed,
            );
            let mut png = Vec::new();
            grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            crate::io::write_atomic(&out, &png)?;
            eprintln!(
                "wrote {} ({count} images: original, view 1, view 2)",
                out.display()
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Show { preset }) => {
            print!("{}", TrainConfig::preset(&preset)?.to_toml());
            Ok(())
        }
        Command::Config(ConfigCommand::List) => {
            for (name, text) in PRESETS {
                let summary = text.lines().next().unwrap_or("").trim_start_matches("# ");
                println!("{name:8} {summary}");
            }
            Ok(())
        }
    }
}

fn eval_knn(args: &KnnArgs) -> Result<()> {
    if args.temperature <= 0.0 {
        anyhow::bail!("--temperature must be positive, got {}", args.temperature);
    }
    if args.k.contains(&0) {
        anyhow::bail!("--k values must be at least 1");
    }
    let backend = args.device.unwrap_or_else(Backend::default_compiled);
    let run = open_run(&args.checkpoint, &backend.training_device()?)?;
    let source = args.data.source()?;
    let size = run.config.data.image_size;
    let test = source.load("test", size, false)?;
    let encoder = &run.byol.online.encoder;
    let accuracies = match args.protocol {
        KnnProtocol::Split => {
            let train = source.load("train", size, false)?;
            knn_train_test(
                encoder,
                &train,
                &test,
                args.features,
                &args.k,
                args.vote,
                args.temperature,
            )
        }
        KnnProtocol::Cv5 => knn_cross_validated(
            encoder,
            &test,
            5,
            args.features,
            &args.k,
            args.vote,
            args.temperature,
        ),
    };
    eprintln!(
        "kNN ({:?}, {:?} vote, {:?} features) of epoch {}:",
        args.protocol, args.vote, args.features, run.state.epoch
    );
    eprintln!("{:>6} {:>8} {:>8}", "k", "top-1 %", "top-5 %");
    for (k, acc) in args.k.iter().zip(&accuracies) {
        eprintln!("{k:>6} {:>8.2} {:>8.2}", 100.0 * acc.top1, 100.0 * acc.top5);
    }
    let results: Vec<_> = args
        .k
        .iter()
        .zip(&accuracies)
        .map(|(k, a)| serde_json::json!({"k": k, "top1": a.top1, "top5": a.top5}))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "top1": accuracies[0].top1, "top5": accuracies[0].top5, "k": args.k[0],
            "vote": args.vote, "temperature": args.temperature, "features": args.features,
            "protocol": format!("{:?}", args.protocol).to_lowercase(), "epoch": run.state.epoch,
            "results": results,
        })
    );
    Ok(())
}

fn bench(args: &BenchArgs) -> Result<()> {
    let mut config = TrainConfig::preset(&args.preset)?;
    args.model.apply(&mut config);
    config.validate()?;
    let reports = match args.kind {
        BenchKind::Train | BenchKind::Infer => {
            let device = args
                .device
                .unwrap_or_else(Backend::default_compiled)
                .training_device()?;
            // Before the check, whose notice holds only for our operations.
            #[cfg(feature = "flex")]
            crate::model::fused::set_enabled(!args.burn_ops);
            let notice = args.precision.check(&device)?;
            config.train.precision = args.precision;
            let _autocast = autocast(args.precision);
            let mut report = if args.kind == BenchKind::Train {
                crate::bench::bench_train(&config, &device, args.warmup, args.steps)
            } else {
                crate::bench::bench_infer(&config, &device, args.warmup, args.steps)
            };
            report.precision = args.precision.name();
            report.notice = notice;
            vec![report]
        }
        BenchKind::Conv => return bench_conv(args, &config),
        BenchKind::Data => {
            let dataset = match &args.data {
                Some(path) => {
                    Some(Source::open(path)?.load("train", config.data.image_size, true)?)
                }
                None => None,
            };
            // One core, then all of them.
            [1, 0]
                .into_iter()
                .map(|threads| {
                    crate::bench::bench_data(
                        &config,
                        dataset.as_ref(),
                        threads,
                        args.warmup,
                        args.steps,
                    )
                })
                .collect()
        }
    };
    for r in &reports {
        eprintln!(
            "{} {}x{}x{} on {} thread(s): {:.1} img/s (median {:.3}s, min {:.3}s, max {:.3}s over {} steps){}{}",
            r.bench,
            r.batch_size,
            r.image_size,
            r.image_size,
            r.threads,
            r.images_per_sec,
            r.timing.median_s,
            r.timing.min_s,
            r.timing.max_s,
            r.timing.steps,
            r.gflops_per_sec
                .map(|g| format!(", {g:.1} GFLOP/s"))
                .unwrap_or_default(),
            r.peak_rss_mib
                .map(|m| format!(", peak RSS {m:.0} MiB"))
                .unwrap_or_default(),
        );
    }
    let json = if reports.len() == 1 {
        serde_json::to_value(&reports[0])?
    } else {
        serde_json::json!({"runs": reports})
    };
    println!("{json}");
    Ok(())
}

/// `byol bench conv`: a line per distinct convolution on stderr, and a JSON last line.
fn bench_conv(args: &BenchArgs, config: &TrainConfig) -> Result<()> {
    #[cfg(feature = "flex")]
    {
        if args.device.is_some_and(|device| device != Backend::Flex) {
            anyhow::bail!(
                "`bench conv` times byol's flex convolutions: leave out --device or pass flex"
            );
        }
        let device = Backend::Flex.training_device()?;
        args.precision.check(&device)?;
        let _autocast = autocast(args.precision);
        let convolutions = crate::bench::bench_conv(config, args.warmup, args.steps);
        for c in &convolutions {
            eprintln!(
                "{:?} x {:?} stride {:?}: {} layer(s), {:.0} MFLOP, forward {:.3} ms, weight \
                 gradient {:.3} ms, input gradient {:.3} ms{}",
                c.input,
                c.weight,
                c.stride,
                c.layers,
                c.mflop,
                c.forward_ms,
                c.weight_grad_ms,
                c.input_grad_ms,
                if c.bf16 { " (bf16)" } else { "" },
            );
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "conv",
                "batch_size": config.data.batch_size,
                "image_size": config.data.image_size,
                "precision": args.precision.name(),
                "threads": rayon::current_num_threads(),
                "convolutions": convolutions,
            })
        );
        Ok(())
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (args, config);
        anyhow::bail!("`bench conv` times byol's flex convolutions: build with the flex feature")
    }
}

fn export(args: &ExportArgs) -> Result<()> {
    let run = open_run(
        &args.checkpoint,
        &Backend::default_compiled().training_device()?,
    )?;
    let c = &run.config;
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "backbone".to_string(),
            format!("{:?}", c.model.backbone.architecture).to_lowercase(),
        ),
        (
            "stem".to_string(),
            format!("{:?}", c.model.backbone.stem).to_lowercase(),
        ),
        ("width".to_string(), c.model.backbone.width.to_string()),
        ("preset".to_string(), c.based_on.clone()),
        (
            "part".to_string(),
            format!("{:?}", args.part).to_lowercase(),
        ),
        ("epoch".to_string(), run.state.epoch.to_string()),
        ("config".to_string(), c.to_toml()),
    ]);
    let count = match args.part {
        ExportPart::Backbone => {
            crate::export::export(&run.byol.online.encoder.backbone, metadata, &args.out)?
        }
        ExportPart::Online => crate::export::export(&run.byol.online, metadata, &args.out)?,
        ExportPart::Target => crate::export::export(&run.byol.target, metadata, &args.out)?,
    };
    eprintln!("wrote {count} tensors to {}", args.out.display());
    println!(
        "{}",
        serde_json::json!({"out": args.out, "tensors": count, "epoch": run.state.epoch})
    );
    Ok(())
}

fn embed(args: &EmbedArgs) -> Result<()> {
    let backend = args.device.unwrap_or_else(Backend::default_compiled);
    let run = open_run(&args.checkpoint, &backend.training_device()?)?;
    let source = args.data.source()?;
    let size = run.config.data.image_size;
    let splits: &[&str] = match args.split {
        Split::Train => &["train"],
        Split::Test => &["test"],
        Split::All => &["train", "test"],
    };
    let (mut features, mut labels, mut csv) = (
        Vec::<u8>::new(),
        Vec::<u8>::new(),
        String::from("index,split,path,label,class\n"),
    );
    let (mut rows, mut dim) = (0usize, 0usize);
    for split in splits {
        let dataset = source.load(split, size, false)?;
        let matrix = crate::eval::embed_encoder(&run.byol.online.encoder, &dataset, args.features);
        dim = matrix.dims()[1];
        features.extend(matrix.into_data().iter::<f32>().flat_map(f32::to_le_bytes));
        for (i, (path, &label)) in dataset.paths.iter().zip(&dataset.labels).enumerate() {
            labels.extend((label as i64).to_le_bytes());
            let path = path.display().to_string().replace('"', "\"\"");
            csv.push_str(&format!(
                "{},{split},\"{path}\",{label},{}\n",
                rows + i,
                dataset.classes[label]
            ));
        }
        rows += dataset.len();
    }
    let stem = args.out.with_extension("");
    let labels_path = stem.with_file_name(format!(
        "{}_labels.npy",
        stem.file_name().unwrap_or_default().to_string_lossy()
    ));
    let csv_path = stem.with_file_name(format!(
        "{}_paths.csv",
        stem.file_name().unwrap_or_default().to_string_lossy()
    ));
    crate::io::write_atomic(
        &args.out,
        &crate::export::npy_bytes("<f4", &[rows, dim], &features),
    )?;
    crate::io::write_atomic(
        &labels_path,
        &crate::export::npy_bytes("<i8", &[rows], &labels),
    )?;
    crate::io::write_atomic(&csv_path, csv.as_bytes())?;
    eprintln!(
        "wrote {rows} x {dim} features to {}, labels to {}, paths to {}",
        args.out.display(),
        labels_path.display(),
        csv_path.display()
    );
    println!(
        "{}",
        serde_json::json!({"features": args.out, "labels": labels_path, "paths": csv_path, "rows": rows, "dim": dim})
    );
    Ok(())
}

fn eval_linear(args: &LinearArgs) -> Result<()> {
    if args.epochs == 0 || args.batch_size == 0 || args.lr <= 0.0 || args.weight_decays.is_empty() {
        anyhow::bail!(
            "--epochs, --batch-size and --lr must be positive and --weight-decays non-empty"
        );
    }
    let backend = args.device.unwrap_or_else(Backend::default_compiled);
    let run = open_run(&args.checkpoint, &backend.training_device()?)?;
    let source = args.data.source()?;
    let size = run.config.data.image_size;
    let (train, test) = (
        source.load("train", size, false)?,
        source.load("test", size, false)?,
    );
    let encoder = &run.byol.online.encoder;
    let train_features = crate::eval::embed_encoder(encoder, &train, args.features);
    let test_features = crate::eval::embed_encoder(encoder, &test, args.features);
    let config = crate::eval::linear::LinearProbeConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decays: args.weight_decays.clone(),
        seed: run.config.train.seed,
    };
    let result = crate::eval::linear::linear_probe(
        train_features,
        &train.labels,
        test_features,
        &test.labels,
        train.num_classes(),
        &config,
    );
    eprintln!(
        "linear probe of epoch {} ({:?} features):",
        run.state.epoch, args.features
    );
    for (wd, acc) in &result.sweep {
        eprintln!("  weight decay {wd:<8} held-out top-1 {:.2}%", 100.0 * acc);
    }
    eprintln!(
        "  test top-1 {:.2}%  top-5 {:.2}%  (weight decay {})",
        100.0 * result.top1,
        100.0 * result.top5,
        result.weight_decay
    );
    println!(
        "{}",
        serde_json::json!({
            "top1": result.top1, "top5": result.top5, "weight_decay": result.weight_decay,
            "sweep": result.sweep, "epochs": args.epochs, "epoch": run.state.epoch, "features": args.features,
        })
    );
    Ok(())
}
