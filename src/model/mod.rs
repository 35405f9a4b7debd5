//! Networks: the ResNet backbone, the MLP heads and the BYOL online/target pair.

pub mod byol;
#[cfg(feature = "flex")]
pub mod fused;
pub mod mlp;
pub mod precision;
pub mod resnet;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

/// Held through a step's forward and backward passes, while the weights stay as they are: on
/// flex, what the convolutions derive from each weight (its bf16 packing, its flipped kernel)
/// is then made once for all of its calls, and each BatchNorm takes its statistics from sums
/// the convolution before it took ([`fused::step_cache`]). Drop it before the optimizer step.
#[must_use = "the caches are kept only while it lives"]
pub struct StepCaches {
    #[cfg(feature = "flex")]
    _scope: fused::step_cache::StepCacheScope,
}

impl StepCaches {
    pub fn start() -> Self {
        StepCaches {
            #[cfg(feature = "flex")]
            _scope: fused::step_cache::StepCacheScope::start(),
        }
    }
}

/// Folds pending BatchNorm running-statistic updates into the stored values.
///
/// burn's `RunningState` keeps each forward's update pending until the next forward reads it,
/// and traversals (records, EMA) see only the stored value. `valid()` syncs every running state
/// in place as a side effect; the validation copy it returns is dropped.
pub fn sync_running_stats(module: &impl Module) {
    let _ = module.valid();
}

/// Initialises every lazily initialised parameter of `module` now.
pub fn materialize(module: &impl Module) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// Gives every parameter a new id, keeping its value and training state: a loaded copy of a
/// module otherwise carries the ids of the module it came from, and optimizers and gradients
/// are keyed by id.
pub fn with_fresh_ids<M: Module>(module: M) -> M {
    struct FreshIds;
    impl ModuleMapper for FreshIds {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (_, value, mapper) = param.consume();
            Param::from_mapped_value(ParamId::new(), value, mapper)
        }
    }
    module.map(&mut FreshIds)
}
