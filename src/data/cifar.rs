//! CIFAR-10 and CIFAR-100 in their official binary formats.
//!
//! CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_{1..5}.bin` and `test_batch.bin`, records of
//! 1 label byte + 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32x32).
//! CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`, records of a coarse label byte,
//! a fine label byte, then the same 3072 pixel bytes; the fine labels are used.

use super::folder::Dataset;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

const PIXELS: usize = 3 * 32 * 32;

/// Which CIFAR variant a folder holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred,
}

impl Cifar {
    /// The variant in `dir` (or in its `cifar-10-batches-bin` / `cifar-100-binary` subfolder).
    pub fn detect(dir: &Path) -> Option<(Cifar, PathBuf)> {
        for candidate in [
            dir.to_path_buf(),
            dir.join("cifar-10-batches-bin"),
            dir.join("cifar-100-binary"),
        ] {
            if candidate.join("data_batch_1.bin").is_file() {
                return Some((Cifar::Ten, candidate));
            }
            if candidate.join("train.bin").is_file() && candidate.join("test.bin").is_file() {
                return Some((Cifar::Hundred, candidate));
            }
        }
        None
    }

    fn files(self, split: &str) -> Vec<String> {
        match (self, split) {
            (Cifar::Ten, "train") => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            (Cifar::Ten, _) => vec!["test_batch.bin".into()],
            (Cifar::Hundred, split) => vec![format!("{split}.bin")],
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Cifar::Ten => 1,
            Cifar::Hundred => 2,
        }
    }

    fn class_names(self, dir: &Path) -> Vec<String> {
        let (file, count) = match self {
            Cifar::Ten => ("batches.meta.txt", 10),
            Cifar::Hundred => ("fine_label_names.txt", 100),
        };
        let names: Vec<String> = std::fs::read_to_string(dir.join(file))
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        if names.len() == count {
            return names;
        }
        match self {
            Cifar::Ten => [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
            .map(String::from)
            .to_vec(),
            Cifar::Hundred => (0..100).map(|i| format!("class_{i:02}")).collect(),
        }
    }

    /// Loads a split, resizing to `size` when it is not 32.
    pub fn load(self, dir: &Path, split: &str, size: usize) -> Result<Dataset> {
        let classes = self.class_names(dir);
        let (mut pixels, mut labels, mut paths) = (Vec::new(), Vec::new(), Vec::new());
        for name in self.files(split) {
            let path = dir.join(&name);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read CIFAR file {}", path.display()))?;
            let (file_pixels, file_labels) = self
                .parse(&bytes, classes.len(), size)
                .with_context(|| format!("CIFAR file {}", path.display()))?;
            pixels.extend(file_pixels);
            paths.extend(
                (0..file_labels.len()).map(|i| PathBuf::from(format!("{}#{i}", path.display()))),
            );
            labels.extend(file_labels);
        }
        Ok(Dataset {
            classes,
            size,
            pixels,
            labels,
            paths,
        })
    }
}

impl Cifar {
    /// The records of one binary file: `size x size` RGB pixels (interleaved) and labels
    /// below `num_classes`. The file must be a whole number of records, at least one.
    pub fn parse(
        self,
        bytes: &[u8],
        num_classes: usize,
        size: usize,
    ) -> Result<(Vec<u8>, Vec<usize>)> {
        let record = self.label_bytes() + PIXELS;
        if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
            bail!(
                "{} bytes, not a multiple of the {record}-byte record: truncated or not {}",
                bytes.len(),
                if self == Cifar::Ten {
                    "CIFAR-10"
                } else {
                    "CIFAR-100"
                }
            );
        }
        let mut pixels = Vec::with_capacity(bytes.len() / record * size * size * 3);
        let mut labels = Vec::with_capacity(bytes.len() / record);
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[self.label_bytes() - 1] as usize;
            if label >= num_classes {
                bail!("record {i} has label {label}, beyond the {num_classes} classes");
            }
            let planes = &rec[self.label_bytes()..];
            let rgb: Vec<u8> = (0..1024)
                .flat_map(|p| [planes[p], planes[1024 + p], planes[2048 + p]])
                .collect();
            let image = image::RgbImage::from_raw(32, 32, rgb).expect("32x32x3 bytes");
            pixels.extend(super::folder::fit(image, size));
            labels.push(label);
        }
        Ok((pixels, labels))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CIFAR-10 record whose pixel planes are constant (r, g, b).
    fn record10(label: u8, rgb: [u8; 3]) -> Vec<u8> {
        let mut r = vec![label];
        for c in rgb {
            r.extend(std::iter::repeat_n(c, 1024));
        }
        r
    }

    pub fn write_cifar10(dir: &Path, per_batch: usize) {
        std::fs::create_dir_all(dir).unwrap();
        for name in [
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
            "test_batch.bin",
        ] {
            let bytes: Vec<u8> = (0..per_batch)
                .flat_map(|i| record10((i % 10) as u8, [i as u8, 100, 200]))
                .collect();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    #[test]
    fn reads_cifar10_planes_into_rgb_pixels_with_labels() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("cifar-10-batches-bin");
        write_cifar10(&bin, 3);
        let (kind, found) = Cifar::detect(dir.path()).unwrap();
        assert_eq!((kind, found.clone()), (Cifar::Ten, bin));
        let train = kind.load(&found, "train", 32).unwrap();
        assert_eq!(
            (train.len(), train.labels[..3].to_vec()),
            (15, vec![0, 1, 2])
        );
        assert_eq!(&train.pixels[32 * 32 * 3..32 * 32 * 3 + 3], &[1, 100, 200]);
        assert_eq!(train.classes[9], "truck");
        assert_eq!(
            kind.load(&found, "test", 16).unwrap().pixels.len(),
            3 * 16 * 16 * 3
        );
    }

    #[test]
    fn reads_cifar100_fine_labels() {
        let dir = tempfile::tempdir().unwrap();
        let rec =
            |coarse: u8, fine: u8| -> Vec<u8> { [vec![coarse, fine], vec![7; PIXELS]].concat() };
        std::fs::write(
            dir.path().join("train.bin"),
            [rec(1, 42), rec(2, 99)].concat(),
        )
        .unwrap();
        std::fs::write(dir.path().join("test.bin"), rec(3, 5)).unwrap();
        let (kind, found) = Cifar::detect(dir.path()).unwrap();
        assert_eq!(kind, Cifar::Hundred);
        let train = kind.load(&found, "train", 32).unwrap();
        assert_eq!(
            (train.labels.clone(), train.num_classes()),
            (vec![42, 99], 100)
        );
    }

    #[test]
    fn a_file_of_the_wrong_size_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path(), 2);
        std::fs::write(dir.path().join("data_batch_3.bin"), vec![0u8; 3073 + 10]).unwrap();
        let err = format!(
            "{:#}",
            Cifar::Ten.load(dir.path(), "train", 32).unwrap_err()
        );
        assert!(
            err.contains("data_batch_3.bin") && err.contains("truncated"),
            "{err}"
        );
    }
}
