//! Training-mode operations of our own for flex, where burn 0.22's generic ones are slow:
//! BatchNorm forward and backward in one pass each, and convolution input gradients on GEMM.
//! Each is a burn backend extension with a hand-written backward; on any other backend, in
//! inference, or when switched off, burn's own module forward runs instead, and burn's ops are
//! the reference in the tests.

pub mod batch_norm;
pub mod conv;

use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns our operations off (or back on) process-wide: `byol bench train --burn-ops` measures
/// burn's own this way, for a before/after in one process.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn is_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}
