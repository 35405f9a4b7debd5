//! What the optimizers' (and the EMA's) one-pass steps on flex share: when they apply, and
//! the parameter and state tensors as slices updated in place.
//!
//! burn's optimizers are a dozen or more element-wise ops per parameter tensor, and flex runs
//! each on one thread below 4 Mi values (every tensor of a ResNet-18 and its heads), so the
//! second core sat idle through the optimizer step.

use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;

/// Values per parallel job: large enough that a job outweighs its scheduling, small enough
/// that a 16 Ki-value bias still makes one job and a 2 Mi-value matrix many.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Whether a step of `tensor` by `grad` takes a fused path: f32 values on flex, with byol's
/// operations on (`--burn-ops` turns them off with the fused layers').
pub(crate) fn applies<const D: usize>(tensor: &Tensor<D>, grad: &Tensor<D>) -> bool {
    let device = tensor.device();
    crate::model::fused::enabled()
        && !device.is_autodiff()
        && crate::model::fused::is_flex(&device)
        && tensor.dtype() == DType::F32
        && grad.dtype() == DType::F32
}

/// `t`, copied into row-major order if it is strided (parameters and state never are).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous f32 tensor, to write in place (burn's element-wise ops do the
/// same with a tensor nobody else holds; one that is shared is copied first).
pub(crate) fn values_mut(t: &mut FlexTensor) -> &mut [f32] {
    let (start, end) = t
        .layout()
        .contiguous_offsets()
        .expect("a contiguous tensor");
    &mut t.storage_mut::<f32>()[start..end]
}
