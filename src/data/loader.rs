//! Two-view batches, augmented on worker threads ahead of the training step.
//!
//! Every sample's randomness comes from its own generator, seeded by (seed, epoch, position in
//! the epoch), so a batch is the same whatever the number of workers.

use super::augment::{AugmentConfig, normalize_into_chw, random_view};
use super::folder::Dataset;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

/// Per-channel mean and standard deviation the views are normalised with (ImageNet's, as
/// lightly and solo-learn use for CIFAR too).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Two augmented views of the same images, each `batch x 3 x size x size`, channel first.
#[derive(Clone, Debug, PartialEq)]
pub struct TwoViewBatch {
    pub view1: Vec<f32>,
    pub view2: Vec<f32>,
    pub batch_size: usize,
    pub size: usize,
}

/// splitmix64, to turn (seed, epoch, position) into well-spread generator seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn rng_for(seed: u64, epoch: usize, position: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ epoch as u64) ^ position as u64))
}

/// The order in which an epoch visits the dataset.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut rng_for(seed, epoch, usize::MAX));
    order
}

/// Augments the images `order[start..start + batch_size]` of `epoch` into a two-view batch.
pub fn two_view_batch(
    dataset: &Dataset,
    augment: &AugmentConfig,
    order: &[usize],
    start: usize,
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> TwoViewBatch {
    let size = dataset.size;
    let per_image = 3 * size * size;
    let mut view1 = vec![0.0f32; batch_size * per_image];
    let mut view2 = vec![0.0f32; batch_size * per_image];
    view1
        .par_chunks_mut(per_image)
        .zip(view2.par_chunks_mut(per_image))
        .enumerate()
        .for_each(|(i, (out1, out2))| {
            let position = start + i;
            let mut rng = rng_for(seed, epoch, position);
            let image = dataset.image(order[position]);
            normalize_into_chw(
                &random_view(&image, size, &augment.view1, &mut rng),
                MEAN,
                STD,
                out1,
            );
            normalize_into_chw(
                &random_view(&image, size, &augment.view2, &mut rng),
                MEAN,
                STD,
                out2,
            );
        });
    TwoViewBatch {
        view1,
        view2,
        batch_size,
        size,
    }
}

/// The un-augmented, normalised images at `indices`, `n x 3 x size x size` (for evaluation).
pub fn plain_batch(dataset: &Dataset, indices: &[usize]) -> Vec<f32> {
    let per_image = 3 * dataset.size * dataset.size;
    let mut out = vec![0.0f32; indices.len() * per_image];
    out.par_chunks_mut(per_image)
        .zip(indices.par_iter())
        .for_each(|(chunk, &i)| normalize_into_chw(&dataset.image(i), MEAN, STD, chunk));
    out
}

/// Which batches of which epoch to produce, and how.
#[derive(Clone, Copy, Debug)]
pub struct EpochSpec {
    pub batch_size: usize,
    pub seed: u64,
    pub epoch: usize,
    /// Skip the batches before this one (resuming inside an epoch).
    pub first_batch: usize,
    /// Augmentation threads, a pool of their own; 0: one per core.
    pub workers: usize,
    /// Batches prepared ahead of the training step.
    pub prefetch: usize,
}

/// Batches of one epoch, produced on a background thread into a bounded queue.
/// The last incomplete batch is dropped (BatchNorm needs full batches).
pub struct EpochLoader {
    receiver: Receiver<TwoViewBatch>,
    /// Batches this loader yields.
    pub batches: usize,
}

impl EpochLoader {
    pub fn batches_per_epoch(len: usize, batch_size: usize) -> usize {
        len / batch_size
    }

    pub fn start(dataset: Arc<Dataset>, augment: AugmentConfig, spec: EpochSpec) -> Self {
        let total = Self::batches_per_epoch(dataset.len(), spec.batch_size);
        let first = spec.first_batch.min(total);
        let (sender, receiver) = sync_channel(spec.prefetch.max(1));
        std::thread::spawn(move || {
            let order = epoch_order(dataset.len(), spec.seed, spec.epoch);
            // A pool of its own: on the global pool, the training step's worker would take
            // up augmentation jobs while it waits in a join (`byol train` 0.85x).
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(spec.workers)
                .thread_name(|i| format!("byol-loader-{i}"))
                .build();
            for b in first..total {
                let make = || {
                    let start = b * spec.batch_size;
                    two_view_batch(
                        &dataset,
                        &augment,
                        &order,
                        start,
                        spec.batch_size,
                        spec.seed,
                        spec.epoch,
                    )
                };
                let batch = match &pool {
                    Ok(pool) => pool.install(make),
                    Err(_) => make(),
                };
                if sender.send(batch).is_err() {
                    return; // The training loop stopped early.
                }
            }
        });
        EpochLoader {
            receiver,
            batches: total - first,
        }
    }
}

impl Iterator for EpochLoader {
    type Item = TwoViewBatch;
    fn next(&mut self) -> Option<TwoViewBatch> {
        self.receiver.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;

    fn dataset(n: usize, size: usize) -> Dataset {
        Dataset {
            classes: vec!["a".into()],
            size,
            pixels: (0..n * size * size * 3)
                .map(|v| (v * 37 % 251) as u8)
                .collect(),
            labels: vec![0; n],
            paths: vec![Default::default(); n],
        }
    }

    #[test]
    fn batches_are_identical_whatever_the_number_of_workers() {
        let ds = Arc::new(dataset(20, 8));
        let augment = TrainConfig::preset("paper").unwrap().data.augment;
        let spec = |epoch, workers, first_batch| EpochSpec {
            batch_size: 6,
            seed: 3,
            epoch,
            first_batch,
            workers,
            prefetch: 2,
        };
        let run = |workers| -> Vec<TwoViewBatch> {
            EpochLoader::start(ds.clone(), augment.clone(), spec(1, workers, 0)).collect()
        };
        let one = run(1);
        assert_eq!(one.len(), 3);
        assert_eq!(one, run(2));
        assert_eq!(one, run(0));
        // Another epoch shuffles and augments differently.
        let other: Vec<TwoViewBatch> =
            EpochLoader::start(ds.clone(), augment.clone(), spec(2, 1, 0)).collect();
        assert_ne!(one, other);
        // Starting inside the epoch yields the same remaining batches.
        let rest: Vec<TwoViewBatch> = EpochLoader::start(ds, augment, spec(1, 1, 1)).collect();
        assert_eq!(rest, one[1..]);
    }

    #[test]
    fn epoch_order_is_a_permutation() {
        let mut order = epoch_order(50, 1, 0);
        assert_ne!(order, (0..50).collect::<Vec<_>>());
        order.sort();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
    }
}
