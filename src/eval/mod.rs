//! Measuring representations: embeddings of a dataset and kNN accuracy on them.

pub mod knn;

use crate::data::folder::Dataset;
use crate::data::loader::plain_batch;
use crate::model::resnet::ResNet;
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

/// Images per forward when embedding.
pub const EMBED_BATCH: usize = 256;

/// Backbone features of every image of `dataset`, `len x feature_dim`, in eval mode (BatchNorm
/// running statistics, no autodiff), on `backbone`'s device without autodiff.
pub fn embed(backbone: &ResNet, dataset: &Dataset) -> Tensor<2> {
    let backbone = backbone.valid();
    let device = inference_device(&backbone);
    let size = dataset.size;
    let indices: Vec<usize> = (0..dataset.len()).collect();
    let chunks: Vec<Tensor<2>> = indices
        .chunks(EMBED_BATCH)
        .map(|chunk| {
            let data = TensorData::new(plain_batch(dataset, chunk), [chunk.len(), 3, size, size]);
            backbone.forward(Tensor::from_data(data, &device))
        })
        .collect();
    Tensor::cat(chunks, 0)
}

fn inference_device(module: &impl Module) -> Device {
    module
        .devices()
        .into_iter()
        .next()
        .unwrap_or_default()
        .without_autodiff()
}
