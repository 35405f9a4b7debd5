//! A run stopped and resumed ends with exactly the weights of a run that never stopped.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use byol::checkpoint;
use byol::config::TrainConfig;
use byol::device::Backend;
use byol::model::precision::Precision;
use byol::train::train;
use std::path::Path;

mod common;
use common::{config, options, write_images};

#[derive(Default)]
struct Values(Vec<Vec<f32>>);
impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().into_data().iter::<f32>().collect());
    }
}

fn weights(run: &Path) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let device = Backend::Flex.training_device().unwrap();
    let (byol, _) =
        checkpoint::load(&run.join("checkpoints/last"), &config(2).model, &device).unwrap();
    let (mut online, mut target) = (Values::default(), Values::default());
    byol.online.visit(&mut online);
    byol.target.visit(&mut target);
    (online.0, target.0)
}

fn losses(run: &Path) -> Vec<Option<f64>> {
    byol::report::read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.loss)
        .collect()
}

#[test]
fn interrupted_and_resumed_runs_equal_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);

    let straight = dir.path().join("straight");
    let result = train(&config(2), &options(&data, &straight, false, false)).unwrap();
    assert!(!result.interrupted);
    assert_eq!(result.rows.len(), 3);

    // Stopped after the first step of epoch 1, then resumed to the end.
    let stopped = dir.path().join("stopped");
    let result = train(&config(2), &options(&data, &stopped, false, true)).unwrap();
    assert!(result.interrupted);
    let result = train(&config(2), &options(&data, &stopped, true, false)).unwrap();
    assert!(!result.interrupted);

    // One epoch, then extended to two with --resume --epochs 2 (constant schedules).
    let extended = dir.path().join("extended");
    train(&config(1), &options(&data, &extended, false, false)).unwrap();
    train(&config(2), &options(&data, &extended, true, false)).unwrap();

    // Same seed, same weights: even with other runs initialising concurrently in this process.
    let straight2 = dir.path().join("straight2");
    train(&config(2), &options(&data, &straight2, false, false)).unwrap();
    let reference = weights(&straight);
    assert!(!reference.0.is_empty());
    assert_eq!(weights(&straight2), reference, "two straight runs differ");
    assert_eq!(weights(&stopped), reference, "interrupted run differs");
    assert_eq!(weights(&extended), reference, "extended run differs");
    assert_eq!(losses(&stopped), losses(&straight));
    assert_eq!(losses(&extended), losses(&straight));
}

#[test]
fn resume_without_a_checkpoint_and_a_second_run_in_the_same_dir_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);
    let run = dir.path().join("run");
    let err = train(&config(1), &options(&data, &run, true, false))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("no checkpoint"), "{err:#}");
    train(&config(1), &options(&data, &run, false, false)).unwrap();
    let err = train(&config(1), &options(&data, &run, false, false))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("--overwrite"), "{err:#}");
}

#[test]
fn gradient_accumulation_steps_once_per_n_batches_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);
    let accumulating = |epochs| {
        let mut c = config(epochs);
        c.data.batch_size = 4;
        c.train.accumulate = 2;
        c
    };
    // 24 images in batches of 4: 6 batches, 3 optimizer steps per epoch.
    let straight = dir.path().join("straight");
    let result = train(&accumulating(2), &options(&data, &straight, false, false)).unwrap();
    assert_eq!(
        result.rows.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![0, 3, 6]
    );

    let stopped = dir.path().join("stopped");
    assert!(
        train(&accumulating(2), &options(&data, &stopped, false, true))
            .unwrap()
            .interrupted
    );
    train(&accumulating(2), &options(&data, &stopped, true, false)).unwrap();
    assert_eq!(weights(&stopped), weights(&straight));
    assert_eq!(losses(&stopped), losses(&straight));
}

/// `byol train --quiet --config CONFIG --data DATA --out RUN`, for flags to be added.
fn train_command(config: &Path, data: &Path, run: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_byol"));
    command
        .args(["train", "--quiet", "--config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(run);
    command
}

/// `kill -9` of a `byol train` process at two points of a checkpoint save: with half the new
/// files written, and between moving the old checkpoint aside and moving the new one in.
/// Either way the previous checkpoint loads, and `--resume` finishes the run.
#[test]
fn kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);
    let config_file = dir.path().join("tiny.toml");
    std::fs::write(&config_file, config(1).to_toml()).unwrap();
    let run = dir.path().join("run");
    let byol = |extra: &[&str]| {
        let mut command = train_command(&config_file, &data, &run);
        command.args(extra);
        command
    };
    assert!(byol(&[]).output().unwrap().status.success());
    let last = run.join("checkpoints/last");
    let device = Backend::Flex.training_device().unwrap();
    let epoch_of = |dir: &Path| {
        checkpoint::load(dir, &config(1).model, &device)
            .unwrap()
            .1
            .epoch
    };
    assert_eq!(epoch_of(&last), 1);

    for stage in ["staging", "renaming"] {
        let mut child = byol(&["--resume", "--epochs", "2"])
            .env("BYOL_TEST_CHECKPOINT_PAUSE", stage)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let marker = format!("checkpoint save paused at {stage}");
        let paused = stderr
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains(&marker));
        assert!(paused, "the save never reached {stage}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        match stage {
            "staging" => {
                let staged = run.join("checkpoints/.last.new");
                assert!(staged.join("online.bpk").is_file() && !staged.join("state.json").exists());
                assert!(last.join("state.json").is_file());
            }
            _ => assert!(!last.exists() && run.join("checkpoints/last.old").is_dir()),
        }
        assert_eq!(
            epoch_of(&last),
            1,
            "the previous checkpoint loads after a kill at {stage}"
        );
    }

    assert!(
        byol(&["--resume", "--epochs", "2"])
            .output()
            .unwrap()
            .status
            .success()
    );
    assert_eq!(epoch_of(&last), 2);
    assert!(!run.join("checkpoints/.last.new").exists());
    assert!(!run.join("checkpoints/last.old").exists());
}

/// `byol train --precision bf16`: recorded in the run's config, kept by `--resume`, and the
/// interrupted-and-resumed bf16 run equals the straight one (bf16 rounding is deterministic on
/// flex); the bf16 weights differ from the f32 run's, so the flag took effect.
#[test]
fn bf16_runs_from_the_cli_resume_exactly_and_differ_from_f32() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_images(&data);
    let config_file = dir.path().join("tiny.toml");
    std::fs::write(&config_file, config(2).to_toml()).unwrap();
    let cli = |run: &Path, extra: &[&str]| {
        let output = train_command(&config_file, &data, run)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };

    let resumed = dir.path().join("resumed");
    cli(&resumed, &["--precision", "bf16", "--epochs", "1"]);
    let recorded = TrainConfig::load(&resumed.join("config.toml")).unwrap();
    assert_eq!(recorded.train.precision, Precision::Bf16);
    cli(&resumed, &["--resume", "--epochs", "2"]);

    let mut bf16 = config(2);
    bf16.train.precision = Precision::Bf16;
    let straight = dir.path().join("straight");
    train(&bf16, &options(&data, &straight, false, false)).unwrap();
    let f32_run = dir.path().join("f32");
    train(&config(2), &options(&data, &f32_run, false, false)).unwrap();

    assert_eq!(
        weights(&resumed),
        weights(&straight),
        "resumed bf16 run differs"
    );
    assert_ne!(
        weights(&f32_run),
        weights(&straight),
        "bf16 changed nothing"
    );
    assert!(
        losses(&straight)
            .iter()
            .skip(1)
            .all(|l| l.is_some_and(f64::is_finite))
    );
}
