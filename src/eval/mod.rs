//! Measuring representations: embeddings of a dataset and kNN accuracy on them.

pub mod knn;
pub mod linear;

use crate::data::folder::Dataset;
use crate::data::loader::plain_batch;
use crate::model::byol::Encoder;
use crate::model::resnet::ResNet;
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use knn::{KnnAccuracy, Vote, knn_accuracies};

/// Images per forward when embedding.
pub const EMBED_BATCH: usize = 256;

/// Which output of the online network represents an image.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Features {
    /// The backbone's pooled features (what is evaluated and shipped).
    Backbone,
    /// The projector's output.
    Projector,
}

/// Backbone features of every image of `dataset`, `len x feature_dim`, in eval mode (BatchNorm
/// running statistics, no autodiff), on `backbone`'s device without autodiff.
pub fn embed(backbone: &ResNet, dataset: &Dataset) -> Tensor<2> {
    embed_with(&backbone.valid(), dataset, |m, x| m.forward(x))
}

/// Features of every image of `dataset` as `features` chooses, in eval mode.
pub fn embed_encoder(encoder: &Encoder, dataset: &Dataset, features: Features) -> Tensor<2> {
    match features {
        Features::Backbone => embed(&encoder.backbone, dataset),
        Features::Projector => embed_with(&encoder.valid(), dataset, |m, x| m.forward(x)),
    }
}

fn embed_with<M: Module>(
    module: &M,
    dataset: &Dataset,
    forward: impl Fn(&M, Tensor<4>) -> Tensor<2>,
) -> Tensor<2> {
    let device = inference_device(module);
    let size = dataset.size;
    let indices: Vec<usize> = (0..dataset.len()).collect();
    let chunks: Vec<Tensor<2>> = indices
        .chunks(EMBED_BATCH)
        .map(|chunk| {
            let data = TensorData::new(plain_batch(dataset, chunk), [chunk.len(), 3, size, size]);
            forward(module, Tensor::from_data(data, &device))
        })
        .collect();
    Tensor::cat(chunks, 0)
}

/// The rows `idx` of `x`, in that order.
pub fn select_rows(x: &Tensor<2>, idx: &[usize]) -> Tensor<2> {
    let ids = TensorData::new(
        idx.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        [idx.len()],
    );
    x.clone()
        .select(0, Tensor::<1, Int>::from_data(ids, &x.device()))
}

/// Stratified k-fold split in dataset order, as scikit-learn's unshuffled `StratifiedKFold`
/// does it in spirit: each class's members, in order, cut into `folds` near-equal runs.
/// Returns the fold of every sample.
pub fn stratified_folds(labels: &[usize], folds: usize) -> Vec<usize> {
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut fold = vec![0; labels.len()];
    for class in 0..classes {
        let members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        for (rank, &i) in members.iter().enumerate() {
            fold[i] = rank * folds / members.len();
        }
    }
    fold
}

fn inference_device(module: &impl Module) -> Device {
    module
        .devices()
        .into_iter()
        .next()
        .unwrap_or_default()
        .without_autodiff()
}

/// kNN accuracies for each k: `train` as memory bank, `test` as queries.
#[allow(clippy::too_many_arguments)]
pub fn knn_train_test(
    encoder: &Encoder,
    train: &Dataset,
    test: &Dataset,
    features: Features,
    ks: &[usize],
    vote: Vote,
    temperature: f64,
) -> Vec<KnnAccuracy> {
    let bank = embed_encoder(encoder, train, features);
    let queries = embed_encoder(encoder, test, features);
    knn_accuracies(
        bank,
        &train.labels,
        queries,
        &test.labels,
        train.num_classes(),
        ks,
        vote,
        temperature,
    )
}

/// The article's protocol: k-fold cross-validated kNN on one split (each fold classified
/// against the other folds), accuracies averaged over the folds.
pub fn knn_cross_validated(
    encoder: &Encoder,
    data: &Dataset,
    folds: usize,
    features: Features,
    ks: &[usize],
    vote: Vote,
    temperature: f64,
) -> Vec<KnnAccuracy> {
    let all = embed_encoder(encoder, data, features);
    let fold_of = stratified_folds(&data.labels, folds);
    let rows = |keep: &dyn Fn(usize) -> bool| -> (Tensor<2>, Vec<usize>) {
        let idx: Vec<usize> = (0..data.len()).filter(|&i| keep(fold_of[i])).collect();
        (
            select_rows(&all, &idx),
            idx.iter().map(|&i| data.labels[i]).collect(),
        )
    };
    let mut sums = vec![
        KnnAccuracy {
            top1: 0.0,
            top5: 0.0
        };
        ks.len()
    ];
    for fold in 0..folds {
        let (bank, bank_labels) = rows(&|f| f != fold);
        let (queries, query_labels) = rows(&|f| f == fold);
        let accs = knn_accuracies(
            bank,
            &bank_labels,
            queries,
            &query_labels,
            data.num_classes(),
            ks,
            vote,
            temperature,
        );
        for (sum, acc) in sums.iter_mut().zip(accs) {
            sum.top1 += acc.top1 / folds as f64;
            sum.top5 += acc.top5 / folds as f64;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_folds_split_each_class_evenly_in_order() {
        let labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1];
        assert_eq!(
            stratified_folds(&labels, 5),
            vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        );
        let folds = stratified_folds(&[0; 12], 5);
        for f in 0..5 {
            let n = folds.iter().filter(|&&x| x == f).count();
            assert!((2..=3).contains(&n));
        }
    }
}
