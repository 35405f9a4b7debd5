//! Helpers shared by the integration tests: a tiny generated image folder and a tiny config.

use byol::config::TrainConfig;
use byol::device::Backend;
use byol::optim::OptimizerKind;
use byol::train::RunOptions;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

pub fn write_images(root: &Path) {
    for (c, class) in ["a", "b", "c"].iter().enumerate() {
        let dir = root.join("train").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..8u32 {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                image::Rgb([
                    (c as u32 * 90 + x * 3) as u8,
                    (y * 11 + i * 17) as u8,
                    ((x ^ y) * 9) as u8,
                ])
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

pub fn config(epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::preset("seed").unwrap();
    c.model.backbone.width = 0.125;
    c.model.projector.hidden_dim = 32;
    c.model.projector.output_dim = 16;
    c.model.predictor.hidden_dim = 32;
    c.model.predictor.output_dim = 16;
    // LARS with momentum: its state must survive the checkpoint too.
    c.optimizer.kind = OptimizerKind::Lars;
    c.optimizer.lr = 0.1;
    c.data.image_size = 16;
    c.data.batch_size = 8;
    c.train.epochs = epochs;
    c.knn.every = 0;
    c
}

pub fn options(data: &Path, out: &Path, resume: bool, stop: bool) -> RunOptions {
    RunOptions {
        data: byol::data::Source::open(data).unwrap(),
        out: out.to_path_buf(),
        device: Backend::Flex.training_device().unwrap(),
        overwrite: false,
        resume,
        init: None,
        progress: false,
        stop: Arc::new(AtomicBool::new(stop)),
    }
}
