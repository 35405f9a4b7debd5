//! Learning-rate schedules, per optimizer step.
//!
//! Written here rather than taken from burn because burn's linear and cosine schedulers reject
//! rates above 1, which LARS recipes use (lr 1.0 x batch/256 and more).

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The base rate throughout (after any warmup).
    Constant,
    /// Cosine decay from the base rate to 0 at the last step (after any warmup).
    Cosine,
}

/// The rate at `step` (0-based) of `total_steps`: linear warmup from `base / warmup_steps` up
/// to `base` over the first `warmup_steps` steps, then `schedule` over the rest.
pub fn lr_at(
    schedule: LrSchedule,
    base: f64,
    step: usize,
    warmup_steps: usize,
    total_steps: usize,
) -> f64 {
    if step < warmup_steps {
        return base * (step + 1) as f64 / warmup_steps as f64;
    }
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Cosine => {
            let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
            let progress = (step - warmup_steps).min(decay_steps) as f64 / decay_steps as f64;
            base * 0.5 * (1.0 + (PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_to_base_then_cosine_falls_to_zero() {
        let (base, warmup, total) = (2.0, 10, 110);
        assert_eq!(lr_at(LrSchedule::Cosine, base, 0, warmup, total), 0.2);
        assert_eq!(lr_at(LrSchedule::Cosine, base, 4, warmup, total), 1.0);
        assert_eq!(lr_at(LrSchedule::Cosine, base, 9, warmup, total), 2.0);
        assert_eq!(lr_at(LrSchedule::Cosine, base, 10, warmup, total), 2.0);
        assert!((lr_at(LrSchedule::Cosine, base, 60, warmup, total) - 1.0).abs() < 1e-12);
        assert!(lr_at(LrSchedule::Cosine, base, 110, warmup, total).abs() < 1e-12);
        assert_eq!(lr_at(LrSchedule::Constant, base, 100, warmup, total), 2.0);
        assert_eq!(lr_at(LrSchedule::Constant, 3e-4, 0, 0, total), 3e-4);
    }
}
