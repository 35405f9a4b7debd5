//! The `byol` command line.

use crate::config::{PRESETS, TrainConfig};
use crate::device::Backend;
use crate::eval::knn::Vote;
use crate::model::resnet::{Architecture, Stem};
use crate::optim::OptimizerKind;
use crate::train::{RunOptions, train};
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

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
    Train(TrainArgs),
    /// Inspect the built-in presets.
    #[command(subcommand)]
    Config(ConfigCommand),
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

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Image folder `DIR/{train,test}/<class>/*.jpg`, or a `.tar.gz` of one (unpacked once into
    /// $BYOL_DATA, else ~/.cache/byol).
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory: config.toml, metrics.jsonl, knn.png, loss.png, checkpoints/last.
    #[arg(long, default_value = "runs/byol")]
    pub out: PathBuf,
    /// Replace an earlier run's results in --out.
    #[arg(long)]
    pub overwrite: bool,
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
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// Preset or config file, then the flags on top.
    pub fn resolve_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(path) => TrainConfig::load(path)?,
            None => TrainConfig::preset(&self.preset)?,
        };
        fn set<T: Clone>(field: &mut T, flag: &Option<T>) {
            if let Some(v) = flag {
                *field = v.clone();
            }
        }
        set(&mut c.train.epochs, &self.epochs);
        set(&mut c.data.batch_size, &self.batch_size);
        set(&mut c.model.backbone.architecture, &self.backbone);
        set(&mut c.model.backbone.stem, &self.stem);
        set(&mut c.model.backbone.width, &self.width);
        set(&mut c.data.image_size, &self.image_size);
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
                data: args.data.clone(),
                out: args.out.clone(),
                device: backend.training_device()?,
                overwrite: args.overwrite,
                progress: !args.quiet && std::io::stderr().is_terminal(),
            };
            tracing::info!(
                "training on {backend:?}; run directory {}",
                options.out.display()
            );
            let rows = train(&config, &options)?;
            if let Some(last) = rows.iter().rev().find(|r| r.knn_top1.is_some()) {
                println!(
                    "{}",
                    serde_json::json!({
                        "run": options.out, "epochs": config.train.epochs, "epoch": last.epoch,
                        "knn_top1": last.knn_top1, "knn_top5": last.knn_top5,
                    })
                );
            }
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
