//! Images in: folders, CIFAR binaries and archives, augmentations, and the two-view loader.

pub mod archive;
pub mod augment;
pub mod cifar;
pub mod download;
pub mod folder;
pub mod loader;
pub mod preview;

use anyhow::Result;
use std::path::{Path, PathBuf};

/// Where a dataset's splits come from, detected from what `--data` points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `ROOT/{train,test}/<class>/*.jpg|png|webp`.
    Folder(PathBuf),
    /// The official CIFAR-10 / CIFAR-100 binary files.
    Cifar(cifar::Cifar, PathBuf),
    /// Images without classes (directly in the folder or below it): pretraining only.
    Unlabeled(PathBuf),
}

/// What `--format` forces; `Auto` detects it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Auto,
    /// `ROOT/{train,test}/<class>/*`.
    Folder,
    /// CIFAR-10 or CIFAR-100 binary files.
    Cifar,
    /// Images without classes.
    Unlabeled,
}

impl Source {
    /// `data` is a folder of any kind, or a `.tar.gz` of one (unpacked once into the cache).
    pub fn open(data: &Path) -> Result<Source> {
        Source::open_as(data, Format::Auto)
    }

    /// As [`Source::open`], but a format other than `Auto` is required, not guessed.
    pub fn open_as(data: &Path, format: Format) -> Result<Source> {
        let dir = archive::resolve_data_dir(data)?;
        if !dir.is_dir() {
            anyhow::bail!("--data {}: no such folder or archive", data.display());
        }
        match format {
            Format::Auto => {
                if let Some((kind, dir)) = cifar::Cifar::detect(&dir) {
                    return Ok(Source::Cifar(kind, dir));
                }
                match folder::find_root(&dir) {
                    Ok(root) => Ok(Source::Folder(root)),
                    Err(_) if folder::holds_images(&dir) => Ok(Source::Unlabeled(dir)),
                    Err(e) => Err(e),
                }
            }
            Format::Cifar => match cifar::Cifar::detect(&dir) {
                Some((kind, dir)) => Ok(Source::Cifar(kind, dir)),
                None => anyhow::bail!(
                    "--format cifar: {} holds no CIFAR binaries (data_batch_1.bin, or train.bin \
                     and test.bin, here or in cifar-10-batches-bin/ or cifar-100-binary/)",
                    dir.display()
                ),
            },
            Format::Folder => Ok(Source::Folder(folder::find_root(&dir)?)),
            Format::Unlabeled if folder::holds_images(&dir) => Ok(Source::Unlabeled(dir)),
            Format::Unlabeled => {
                anyhow::bail!("--format unlabeled: no images in {}", dir.display())
            }
        }
    }

    /// Whether the source has labels and a test split (what kNN needs).
    pub fn is_labelled(&self) -> bool {
        !matches!(self, Source::Unlabeled(_))
    }

    /// Loads `split` ("train" or "test") with images resized to `size x size`; `skip_bad`
    /// leaves undecodable image files out instead of failing.
    pub fn load(&self, split: &str, size: usize, skip_bad: bool) -> Result<folder::Dataset> {
        match self {
            Source::Folder(root) => folder::load_split(root, split, size, skip_bad),
            Source::Cifar(kind, dir) => kind.load(dir, split, size),
            Source::Unlabeled(dir) if split == "train" => {
                folder::load_unlabeled(dir, size, skip_bad)
            }
            Source::Unlabeled(dir) => anyhow::bail!(
                "{} is an unlabeled folder: it has no {split} split",
                dir.display()
            ),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Folder(root) => format!("image folder {}", root.display()),
            Source::Cifar(kind, dir) => format!("{kind:?} binary files in {}", dir.display()),
            Source::Unlabeled(dir) => format!("unlabeled folder {}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_cifar_binaries_and_image_folders() {
        let dir = tempfile::tempdir().unwrap();
        let cifar_dir = dir.path().join("c10");
        cifar::tests::write_cifar10(&cifar_dir.join("cifar-10-batches-bin"), 4);
        let source = Source::open(&cifar_dir).unwrap();
        assert!(matches!(source, Source::Cifar(cifar::Cifar::Ten, _)));
        assert_eq!(source.load("train", 32, false).unwrap().len(), 20);

        let folder_dir = dir.path().join("folder");
        folder::tests::write_folder(&folder_dir.join("set"), "train", &["x", "y"], 2, 8);
        let source = Source::open(&folder_dir).unwrap();
        assert_eq!(source, Source::Folder(folder_dir.join("set")));
        assert_eq!(source.load("train", 8, false).unwrap().len(), 4);

        let err = format!(
            "{:#}",
            Source::open(&dir.path().join("missing")).unwrap_err()
        );
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn a_forced_format_is_required_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let folder_dir = dir.path().join("folder");
        folder::tests::write_folder(&folder_dir, "train", &["x", "y"], 2, 8);
        let err = format!(
            "{:#}",
            Source::open_as(&folder_dir, Format::Cifar).unwrap_err()
        );
        assert!(
            err.contains("--format cifar") && err.contains("folder"),
            "{err}"
        );
        // The same images, read as an unlabeled folder: pretraining only.
        let source = Source::open_as(&folder_dir, Format::Unlabeled).unwrap();
        assert!(!source.is_labelled());
        assert_eq!(source.load("train", 8, false).unwrap().len(), 4);
        assert!(
            Source::open_as(&folder_dir, Format::Folder)
                .unwrap()
                .is_labelled()
        );
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = format!(
            "{:#}",
            Source::open_as(&empty, Format::Unlabeled).unwrap_err()
        );
        assert!(err.contains("no images"), "{err}");
    }
}
