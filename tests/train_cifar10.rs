//! End to end: `byol train` on a few hundred real CIFAR-10 images from `../shared/data`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHIVE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/cifar10-jpg.tar.gz"
);

/// Extracts the first `train` and `test` images of every class from the archive into `dest`
/// (streaming: only those files are written).
fn small_cifar10(dest: &Path, train: usize, test: usize) -> PathBuf {
    let root = dest.join("cifar10");
    let file = std::fs::File::open(ARCHIVE).expect("../shared/data/cifar10-jpg.tar.gz is present");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut counts: HashMap<(String, String), usize> = HashMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        let parts: Vec<String> = path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        // cifar10/<split>/<class>/<file>.jpg
        let [_, split, class, name] = parts.as_slice() else {
            continue;
        };
        let quota = match split.as_str() {
            "train" => train,
            "test" => test,
            _ => continue,
        };
        let count = counts.entry((split.clone(), class.clone())).or_default();
        if *count >= quota || !name.ends_with(".jpg") {
            continue;
        }
        *count += 1;
        let out = root.join(split).join(class);
        std::fs::create_dir_all(&out).unwrap();
        entry.unpack(out.join(name)).unwrap();
    }
    assert_eq!(counts.len(), 20, "ten classes in each split");
    root
}

/// Runs `byol ARGS`, asserts success and returns its last stdout line as JSON.
fn byol(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_byol"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[derive(serde::Deserialize)]
struct Row {
    epoch: usize,
    step: usize,
    loss: Option<f64>,
    lr: Option<f64>,
    tau: Option<f64>,
    knn_top1: Option<f64>,
    knn_top5: Option<f64>,
    images_per_sec: Option<f64>,
    epoch_seconds: Option<f64>,
}

#[test]
fn train_two_epochs_on_real_cifar10_writes_the_run_and_the_loss_falls() {
    let work = tempfile::tempdir().unwrap();
    let data = small_cifar10(work.path(), 32, 20);
    let out = work.path().join("run");
    let status = Command::new(env!("CARGO_BIN_EXE_byol"))
        .args(["train", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--width",
            "0.125",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--knn-every",
            "1",
            "--lr",
            "1e-3",
        ])
        .args(["--seed", "1", "--quiet"])
        .status()
        .unwrap();
    assert!(status.success());

    for file in [
        "config.toml",
        "metrics.jsonl",
        "knn.png",
        "loss.png",
        "checkpoints/last/online.bpk",
        "checkpoints/last/target.bpk",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let rows: Vec<Row> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(
        rows[0].loss.is_none() && rows[0].knn_top1.is_some(),
        "epoch 0 is the random-init kNN baseline"
    );
    assert_eq!((rows[1].step, rows[2].step), (10, 20));
    for row in &rows[1..] {
        assert!(row.lr.is_some() && row.tau == Some(0.99));
        assert!(row.images_per_sec.unwrap() > 0.0 && row.epoch_seconds.unwrap() > 0.0);
        let (top1, top5) = (row.knn_top1.unwrap(), row.knn_top5.unwrap());
        assert!((0.0..=1.0).contains(&top1) && top1 <= top5);
    }
    let (first, last) = (rows[1].loss.unwrap(), rows[2].loss.unwrap());
    assert!(last < first, "loss did not fall: {first} -> {last}");

    // `byol eval knn` on the checkpoint reproduces the monitor's last measurement, from the run
    // directory or a file of its checkpoint, and takes several k and the article's protocol.
    let (out_s, data_s) = (out.to_str().unwrap(), data.to_str().unwrap());
    let same = byol(&["eval", "knn", "--checkpoint", out_s, "--data", data_s]);
    assert_eq!(same["top1"].as_f64(), rows[2].knn_top1);
    assert_eq!(same["top5"].as_f64(), rows[2].knn_top5);
    let online_file = out.join("checkpoints/last/online.bpk");
    let from_file = byol(&[
        "eval",
        "knn",
        "--checkpoint",
        online_file.to_str().unwrap(),
        "--data",
        data_s,
    ]);
    assert_eq!(from_file["top1"], same["top1"]);
    let many = byol(&[
        "eval",
        "knn",
        "--checkpoint",
        out_s,
        "--data",
        data_s,
        "--k",
        "1,20",
        "--vote",
        "majority",
    ]);
    assert_eq!(many["results"].as_array().unwrap().len(), 2);
    let cv = byol(&[
        "eval",
        "knn",
        "--checkpoint",
        out_s,
        "--data",
        data_s,
        "--protocol",
        "cv5",
        "--k",
        "1",
    ]);
    assert!((0.0..=1.0).contains(&cv["top1"].as_f64().unwrap()));
    let probe = byol(&[
        "eval",
        "linear",
        "--checkpoint",
        out_s,
        "--data",
        data_s,
        "--epochs",
        "5",
        "--weight-decays",
        "0,1e-4",
    ]);
    assert!((0.0..=1.0).contains(&probe["top1"].as_f64().unwrap()));
    assert_eq!(probe["sweep"].as_array().unwrap().len(), 2);

    // Export the backbone under torchvision's names, embed both splits, and start a new run
    // from the exported weights.
    let weights = work.path().join("backbone.safetensors");
    let exported = byol(&[
        "export",
        "--checkpoint",
        out_s,
        "--out",
        weights.to_str().unwrap(),
    ]);
    assert_eq!(exported["tensors"], 100);
    let bytes = std::fs::read(&weights).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    for (key, value) in [
        ("backbone", "resnet18"),
        ("stem", "cifar"),
        ("width", "0.125"),
        ("preset", "seed"),
        ("epoch", "2"),
    ] {
        assert_eq!(meta.get(key).map(String::as_str), Some(value), "{key}");
    }
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        file.tensor("layer2.0.downsample.0.weight").unwrap().shape(),
        &[16, 8, 1, 1]
    );
    let features = work.path().join("emb.npy");
    let embedded = byol(&[
        "embed",
        "--checkpoint",
        out_s,
        "--data",
        data_s,
        "--split",
        "all",
        "--out",
        features.to_str().unwrap(),
    ]);
    assert_eq!(
        (embedded["rows"].as_u64(), embedded["dim"].as_u64()),
        (Some(520), Some(64))
    );
    let npy = std::fs::read(&features).unwrap();
    assert_eq!(npy.len(), 128 + 520 * 64 * 4);
    let csv = std::fs::read_to_string(work.path().join("emb_paths.csv")).unwrap();
    assert_eq!(csv.lines().count(), 521);
    assert!(
        csv.lines().nth(1).unwrap().starts_with("0,train,")
            && csv.lines().last().unwrap().starts_with("519,test,")
    );
    assert_eq!(
        std::fs::read(work.path().join("emb_labels.npy"))
            .unwrap()
            .len(),
        128 + 520 * 8
    );
    let second = work.path().join("second");
    byol(&[
        "train",
        "--data",
        data_s,
        "--out",
        second.to_str().unwrap(),
        "--width",
        "0.125",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--knn-every",
        "0",
        "--quiet",
        "--init",
        weights.to_str().unwrap(),
    ]);

    // The same --out again is refused rather than overwritten.
    let again = Command::new(env!("CARGO_BIN_EXE_byol"))
        .args(["train", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--width", "0.125", "--epochs", "1", "--quiet"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
}

#[test]
fn bad_flags_and_data_get_clear_errors() {
    let work = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_byol"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = work.path().join("nowhere");
    let err = run(&[
        "train",
        "--data",
        missing.to_str().unwrap(),
        "--out",
        work.path().join("r").to_str().unwrap(),
    ]);
    assert!(err.contains("nowhere"), "{err}");
    let err = run(&["train", "--data", ".", "--preset", "imaginary"]);
    assert!(err.contains("imaginary"), "{err}");
    let err = run(&["train", "--data", ".", "--tau", "2"]);
    assert!(err.contains("ema.tau_base"), "{err}");
}
