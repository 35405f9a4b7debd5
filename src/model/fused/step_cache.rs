//! What a training step's operations compute once and reuse, kept while a
//! [`StepCacheScope`] lives on the thread that runs them:
//!
//! - What the convolutions derive from a weight tensor (its bf16 AMX packing, its flipped
//!   kernel for the input gradient), made once per step instead of once per call ([`derived`]).
//!   A BYOL step convolves each weight four times (online and target, two views each) and runs
//!   each stride-1 input gradient twice, and every call packed its weights anew: about 3.5% of
//!   the bf16 step.
//! - The per-sample sums that BatchNorm's statistics are made of, taken by a convolution from
//!   each sample's output while it is still in cache ([`remember_sums`]), for the norm that
//!   reads that output next ([`take_sums`]) instead of a pass over it from memory.
//!
//! Entries hold a clone of their tensor's `Arc` of bytes, so that storage can be neither freed
//! (and its address reused) nor written in place (flex copies shared storage before writing):
//! the same address means the same values. Drop the scope before the optimizer and the EMA
//! update the weights, so that they write in place as without it.

use burn_flex::FlexTensor;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

thread_local! {
    /// Live scopes on this thread (the one that runs the step's operations): the cache is
    /// used while there is one, and emptied when the last goes. Per thread, so that steps
    /// on other threads (tests in parallel) neither see nor clear it.
    static SCOPES: Cell<usize> = const { Cell::new(0) };
    static CACHE: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
    static SUMS: RefCell<Vec<Sums>> = const { RefCell::new(Vec::new()) };
}

/// A tensor's storage, held (so that its address stays its own), and its layout: what an
/// entry is kept for.
struct Key {
    source: std::sync::Arc<dyn Any + Send + Sync>,
    layout: burn_flex::Layout,
}

impl Key {
    fn of(tensor: &FlexTensor) -> Self {
        Key {
            source: tensor.data_arc(),
            layout: tensor.layout().clone(),
        }
    }

    /// Whether `tensor` is this key's storage in this key's layout.
    fn names(&self, tensor: &FlexTensor) -> bool {
        let source: std::sync::Arc<dyn Any + Send + Sync> = tensor.data_arc();
        std::sync::Arc::ptr_eq(&self.source, &source) && &self.layout == tensor.layout()
    }
}

/// Per-sample sums of a convolution's output, for the norm that reads it next.
struct Sums {
    output: Key,
    sums: Vec<[f32; 3]>,
}

/// Outputs whose sums wait for their norm at most: each is normally taken right after it is
/// made, and one that never is (a convolution whose output no norm reads) holds its tensor.
const MAX_SUMS: usize = 4;

struct Entry {
    weight: Key,
    kind: &'static str,
    value: Rc<dyn Any>,
}

/// While alive, [`derived`] on this thread makes each value once per weight storage and kind,
/// and [`remember_sums`] keeps sums for [`take_sums`].
#[must_use = "the cache is used only while the scope lives"]
pub struct StepCacheScope(std::marker::PhantomData<*const ()>);

impl StepCacheScope {
    /// Opens a scope on this thread. The weights must not be written in place until it is
    /// dropped (flex copies them instead, which costs a copy and nothing else).
    pub fn start() -> Self {
        SCOPES.set(SCOPES.get() + 1);
        StepCacheScope(std::marker::PhantomData)
    }
}

impl Drop for StepCacheScope {
    fn drop(&mut self) {
        SCOPES.set(SCOPES.get() - 1);
        if SCOPES.get() == 0 {
            // Taken out first: dropping the values may run other code.
            let entries = (CACHE.take(), SUMS.take());
            drop(entries);
        }
    }
}

/// `make()`, the value of `kind` derived from `weight`: the one made before for the same
/// storage and layout while a [`StepCacheScope`] lives on this thread, else made now (and
/// kept while one does).
pub(super) fn derived<T: Any>(
    weight: &FlexTensor,
    kind: &'static str,
    make: impl FnOnce() -> T,
) -> Rc<T> {
    if SCOPES.get() == 0 {
        return Rc::new(make());
    }
    let found = CACHE.with_borrow(|cache| {
        cache
            .iter()
            .find_map(|e| (e.kind == kind && e.weight.names(weight)).then(|| e.value.clone()))
    });
    if let Some(value) = found {
        return value.downcast().expect("one type per kind");
    }
    // Made outside the borrow: packing runs on the thread pool, whose jobs this thread may
    // run while it waits.
    let value = Rc::new(make());
    CACHE.with_borrow_mut(|cache| {
        cache.push(Entry {
            weight: Key::of(weight),
            kind,
            value: value.clone(),
        })
    });
    value
}

/// Keeps `sums` (per sample and channel, as [`super::batch_norm`] makes them) for the norm of
/// `output`, while a [`StepCacheScope`] lives on this thread.
pub(super) fn remember_sums(output: &FlexTensor, sums: Vec<[f32; 3]>) {
    if SCOPES.get() == 0 {
        return;
    }
    SUMS.with_borrow_mut(|kept| {
        if kept.len() == MAX_SUMS {
            kept.remove(0);
        }
        kept.push(Sums {
            output: Key::of(output),
            sums,
        });
    });
}

/// The sums kept for `input` by [`remember_sums`], taken out of the cache.
pub(super) fn take_sums(input: &FlexTensor) -> Option<Vec<[f32; 3]>> {
    SUMS.with_borrow_mut(|kept| {
        let at = kept.iter().position(|k| k.output.names(input))?;
        Some(kept.remove(at).sums)
    })
}

/// Whether a scope lives on this thread: whether sums made now would be kept.
pub(super) fn in_scope() -> bool {
    SCOPES.get() > 0
}

/// Entries in the cache now (for the tests).
#[cfg(test)]
pub(super) fn entries() -> usize {
    CACHE.with_borrow(Vec::len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Shape;

    #[test]
    fn a_scope_makes_each_value_once_per_weight_storage_layout_and_kind() {
        let weight = super::super::tensor(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], Shape::new([2, 3]));
        let made = Cell::new(0);
        let derive = |w: &FlexTensor, kind| {
            *derived(w, kind, || {
                made.set(made.get() + 1);
                made.get()
            })
        };
        // Without a scope, each call makes its value.
        assert_eq!([derive(&weight, "a"), derive(&weight, "a")], [1, 2]);
        {
            let _scope = StepCacheScope::start();
            assert_eq!(derive(&weight, "a"), 3);
            // A clone shares the storage: the value made for it.
            assert_eq!(derive(&weight.clone(), "a"), 3);
            assert_eq!(derive(&weight, "b"), 4);
            // The same values in other storage, and the same storage in another layout.
            let copy = super::super::tensor(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], Shape::new([2, 3]));
            assert_eq!(derive(&copy, "a"), 5);
            let transposed = weight.clone().with_layout(weight.layout().transpose(0, 1));
            assert_eq!(derive(&transposed, "a"), 6);
            assert_eq!(derive(&transposed, "a"), 6);
            // A nested scope shares the cache and leaves it when it goes.
            drop(StepCacheScope::start());
            assert_eq!(derive(&weight, "a"), 3);
            assert_eq!(entries(), 4);
            // The cache holds the storage, so nothing writes it in place.
            assert!(!weight.is_unique());
        }
        assert_eq!(entries(), 0);
        assert!(weight.is_unique());
        assert_eq!(derive(&weight, "a"), 7);
    }

    #[test]
    fn sums_are_kept_under_a_scope_for_one_taker() {
        let output = |v: f32| super::super::tensor(vec![v; 4], Shape::new([2, 2]));
        let sums = |v: f32| vec![[v, 0.0, 0.0]; 2];
        let first = output(1.0);
        remember_sums(&first, sums(1.0));
        assert_eq!(take_sums(&first), None, "kept without a scope");
        let scope = StepCacheScope::start();
        remember_sums(&first, sums(1.0));
        // The same values in other storage are another output.
        assert_eq!(take_sums(&output(1.0)), None);
        assert_eq!(take_sums(&first.clone()), Some(sums(1.0)));
        assert_eq!(take_sums(&first), None, "taken twice");
        // Outputs no norm takes are let go beyond the last few.
        let outputs: Vec<_> = (0..=MAX_SUMS).map(|i| output(i as f32)).collect();
        for (i, out) in outputs.iter().enumerate() {
            remember_sums(out, sums(i as f32));
        }
        assert_eq!(take_sums(&outputs[0]), None);
        assert_eq!(take_sums(&outputs[1]), Some(sums(1.0)));
        drop(scope);
        let _scope = StepCacheScope::start();
        assert_eq!(take_sums(&outputs[2]), None, "kept past the scope");
    }
}
