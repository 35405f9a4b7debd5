//! The run stops cleanly on a non-finite loss and on representation collapse.

use byol::checkpoint;
use byol::device::Backend;
use byol::train::train;

mod common;
use common::{config, options, write_images};

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);
    let run = dir.path().join("run");
    train(&config(1), &options(&data, &run, false, false)).unwrap();

    // Continue with an absurd learning rate: the weights blow up within a step or two.
    let mut diverging = config(3);
    diverging.optimizer.kind = byol::optim::OptimizerKind::Sgd;
    diverging.optimizer.lr = 1e30;
    let err = train(&diverging, &options(&data, &run, true, false))
        .err()
        .expect("the run must stop");
    let message = format!("{err:#}");
    assert!(
        message.contains("loss became") && message.contains("checkpoints"),
        "{message}"
    );

    let device = Backend::Flex.training_device().unwrap();
    let (_, state) =
        checkpoint::load(&run.join("checkpoints/last"), &config(1).model, &device).unwrap();
    assert_eq!(state.epoch, 1, "the last good checkpoint is kept");
}

#[test]
fn collapse_guard_stops_the_run_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);
    // A threshold no spread can meet: the guard must fire after `collapse_patience` epochs.
    let mut c = config(5);
    c.train.collapse_threshold = 10.0;
    c.train.collapse_patience = 2;
    let run = dir.path().join("run");
    let err = train(&c, &options(&data, &run, false, false))
        .err()
        .expect("the guard must stop the run");
    assert!(
        format!("{err:#}").contains("representation collapse"),
        "{err:#}"
    );
    let rows = byol::report::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.last().unwrap().epoch, 2);
    assert!(rows[1].projection_std.unwrap() > 0.0);
}

#[test]
fn a_model_forced_to_collapse_is_stopped_by_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);
    // No predictor and a target that copies the online network every step (tau = 0): the loss
    // is minimised by mapping every image to one point (the paper's collapse ablation).
    let mut c = config(40);
    c.model.use_predictor = false;
    c.ema.tau_base = 0.0;
    c.ema.schedule = byol::ema::TauSchedule::Constant;
    c.optimizer.lr = 0.5;
    c.train.collapse_patience = 2;
    let run = dir.path().join("run");
    let err = train(&c, &options(&data, &run, false, false))
        .err()
        .expect("the guard must stop the collapsing run");
    assert!(
        format!("{err:#}").contains("representation collapse"),
        "{err:#}"
    );
    let rows = byol::report::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let spread: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.projection_std)
        .map(|std| std * (c.model.projector.output_dim as f64).sqrt())
        .collect();
    let threshold = c.train.collapse_threshold;
    assert!(spread[0] > 0.2, "healthy at first: {spread:?}");
    assert!(
        spread.iter().rev().take(2).all(|&s| s < threshold),
        "{spread:?}"
    );
    let stopped_at = rows.last().unwrap().epoch;
    assert!(stopped_at < 40, "stopped early");

    // The control: the same run with BYOL's predictor and slow target keeps its spread.
    let mut healthy = c.clone();
    healthy.model.use_predictor = true;
    healthy.ema.tau_base = 0.99;
    healthy.train.epochs = stopped_at;
    let control = dir.path().join("control");
    train(&healthy, &options(&data, &control, false, false)).unwrap();
    let rows = byol::report::read_metrics(&control.join("metrics.jsonl")).unwrap();
    let last =
        rows.last().unwrap().projection_std.unwrap() * (c.model.projector.output_dim as f64).sqrt();
    eprintln!("collapsing run: {spread:?}; with the predictor at epoch {stopped_at}: {last}");
    assert!(last > 2.0 * threshold, "{last}");
}
