//! Images in: folders, CIFAR binaries and archives, augmentations, and the two-view loader.

pub mod archive;
pub mod augment;
pub mod cifar;
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
}

impl Source {
    /// `data` is a folder of either kind, or a `.tar.gz` of one (unpacked once into the cache).
    pub fn open(data: &Path) -> Result<Source> {
        let dir = archive::resolve_data_dir(data)?;
        if let Some((kind, dir)) = cifar::Cifar::detect(&dir) {
            return Ok(Source::Cifar(kind, dir));
        }
        Ok(Source::Folder(folder::find_root(&dir)?))
    }

    /// Loads `split` ("train" or "test") with images resized to `size x size`.
    pub fn load(&self, split: &str, size: usize) -> Result<folder::Dataset> {
        match self {
            Source::Folder(root) => folder::load_split(root, split, size),
            Source::Cifar(kind, dir) => kind.load(dir, split, size),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Folder(root) => format!("image folder {}", root.display()),
            Source::Cifar(kind, dir) => format!("{kind:?} binary files in {}", dir.display()),
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
        assert_eq!(source.load("train", 32).unwrap().len(), 20);

        let folder_dir = dir.path().join("folder");
        folder::tests::write_folder(&folder_dir.join("set"), "train", &["x", "y"], 2, 8);
        let source = Source::open(&folder_dir).unwrap();
        assert_eq!(source, Source::Folder(folder_dir.join("set")));
        assert_eq!(source.load("train", 8).unwrap().len(), 4);

        let err = format!(
            "{:#}",
            Source::open(&dir.path().join("missing")).unwrap_err()
        );
        assert!(err.contains("missing"), "{err}");
    }
}
