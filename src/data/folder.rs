//! Labelled image folders: `ROOT/{train,test}/<class>/*.{jpg,jpeg,png,webp}`.
//!
//! Images are decoded once, resized to a square side and kept in memory as RGB bytes (CIFAR-10's
//! 60,000 images take 180 MB), so that every epoch only augments.

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

use super::augment::Image;

const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

/// Decoded images of one split with their labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub classes: Vec<String>,
    /// Side of every (square) image.
    pub size: usize,
    /// `len x size x size x 3` RGB bytes.
    pub pixels: Vec<u8>,
    pub labels: Vec<usize>,
    pub paths: Vec<PathBuf>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn image_bytes(&self, index: usize) -> &[u8] {
        let n = self.size * self.size * 3;
        &self.pixels[index * n..(index + 1) * n]
    }

    pub fn image(&self, index: usize) -> Image {
        Image::from_rgb8(self.size, self.size, self.image_bytes(index))
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            classes: self.classes.clone(),
            size: self.size,
            pixels: indices
                .iter()
                .flat_map(|&i| self.image_bytes(i).iter().copied())
                .collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            paths: indices.iter().map(|&i| self.paths[i].clone()).collect(),
        }
    }

    /// A class-balanced subset of `n` images: `n / classes` from each class (the remainder
    /// going to the first classes), drawn at random with `seed`, kept in dataset order.
    pub fn balanced_subset(&self, n: usize, seed: u64) -> Dataset {
        if n == 0 || n >= self.len() {
            return self.clone();
        }
        let classes = self.num_classes();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut chosen = Vec::with_capacity(n);
        for class in 0..classes {
            let mut members: Vec<usize> = (0..self.len())
                .filter(|&i| self.labels[i] == class)
                .collect();
            members.shuffle(&mut rng);
            let quota = n / classes + usize::from(class < n % classes);
            chosen.extend(members.into_iter().take(quota));
        }
        chosen.sort_unstable();
        self.select(&chosen)
    }
}

/// Finds the folder that holds `train/` (the folder itself, or its only subfolder that does,
/// as `cifar10-jpg.tar.gz` unpacks to `cifar10/train`).
pub fn find_root(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!(
            "data directory {} does not exist or is not a directory",
            dir.display()
        );
    }
    if dir.join("train").is_dir() {
        return Ok(dir.to_path_buf());
    }
    let candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read data directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("train").is_dir())
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no `train/` folder in {} (expected DIR/train/<class>/*.jpg)",
            dir.display()
        ),
        _ => bail!(
            "several folders with a `train/` inside {}: point --data at one of them",
            dir.display()
        ),
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes one file to `size x size` RGB bytes (bilinear resize when its size differs).
pub fn decode(path: &Path, size: usize) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot open image {}", path.display()))?;
    decode_bytes(&bytes, size).with_context(|| format!("cannot decode image {}", path.display()))
}

/// Larger images are refused rather than risk exhausting memory on a corrupt header.
const MAX_SIDE: u32 = 1 << 14;

/// Decodes an encoded image (format from its first bytes) to `size x size` RGB bytes.
pub fn decode_bytes(bytes: &[u8], size: usize) -> Result<Vec<u8>> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    let image = reader.decode()?.into_rgb8();
    if image.width() == 0 || image.height() == 0 {
        bail!("empty image ({}x{})", image.width(), image.height());
    }
    Ok(fit(image, size))
}

/// `image` as `size x size` RGB bytes: as it is when it has that size, else resized bilinearly.
pub fn fit(image: image::RgbImage, size: usize) -> Vec<u8> {
    if image.width() as usize == size && image.height() as usize == size {
        return image.into_raw();
    }
    image::imageops::resize(
        &image,
        size as u32,
        size as u32,
        image::imageops::FilterType::Triangle,
    )
    .into_raw()
}

/// Loads `ROOT/<split>/<class>/*`, classes in sorted order, files sorted within each class.
pub fn load_split(root: &Path, split: &str, size: usize, skip_bad: bool) -> Result<Dataset> {
    let split_dir = root.join(split);
    if !split_dir.is_dir() {
        bail!(
            "missing split folder {} (expected {}/<class>/*.jpg)",
            split_dir.display(),
            split_dir.display()
        );
    }
    let class_dirs: Vec<PathBuf> = sorted_entries(&split_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    if class_dirs.is_empty() {
        bail!("no class folders in {}", split_dir.display());
    }
    let mut classes = Vec::new();
    let mut files = Vec::new();
    for (label, dir) in class_dirs.iter().enumerate() {
        let images: Vec<PathBuf> = sorted_entries(dir)?
            .into_iter()
            .filter(|p| is_image(p))
            .collect();
        if images.is_empty() {
            bail!(
                "class folder {} holds no images (.jpg, .jpeg, .png, .webp)",
                dir.display()
            );
        }
        classes.push(
            dir.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
        files.extend(images.into_iter().map(|p| (p, label)));
    }
    decode_all(classes, files, size, skip_bad)
}

/// Decodes `files` in parallel. With `skip_bad`, undecodable files are left out (and counted
/// in a warning) instead of failing the load.
fn decode_all(
    classes: Vec<String>,
    files: Vec<(PathBuf, usize)>,
    size: usize,
    skip_bad: bool,
) -> Result<Dataset> {
    let decoded: Vec<Result<Vec<u8>>> = files
        .par_iter()
        .map(|(path, _)| decode(path, size))
        .collect();
    let (mut pixels, mut labels, mut paths, mut skipped) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((path, label), image) in files.into_iter().zip(decoded) {
        match image {
            Ok(bytes) => {
                pixels.extend(bytes);
                labels.push(label);
                paths.push(path);
            }
            Err(e) if skip_bad => skipped.push(format!("{e:#}")),
            Err(e) => return Err(e.context("pass --skip-bad to leave undecodable images out")),
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(
            "skipped {} undecodable images, e.g. {}",
            skipped.len(),
            skipped[0]
        );
    }
    if labels.is_empty() {
        bail!("no decodable images");
    }
    Ok(Dataset {
        classes,
        size,
        pixels,
        labels,
        paths,
    })
}

/// Every image under `dir` (recursively, in sorted order), unlabeled: pretraining only.
pub fn load_unlabeled(dir: &Path, size: usize, skip_bad: bool) -> Result<Dataset> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in sorted_entries(dir)? {
            if entry.is_dir() {
                walk(&entry, out)?;
            } else if is_image(&entry) {
                out.push(entry);
            }
        }
        Ok(())
    }
    let mut images = Vec::new();
    walk(dir, &mut images)?;
    if images.is_empty() {
        bail!(
            "no images (.jpg, .jpeg, .png, .webp) under {}",
            dir.display()
        );
    }
    decode_all(
        vec!["unlabeled".into()],
        images.into_iter().map(|p| (p, 0)).collect(),
        size,
        skip_bad,
    )
}

/// Whether any image lies under `dir` (at any depth).
pub fn holds_images(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| {
            let path = e.path();
            if path.is_dir() {
                holds_images(&path)
            } else {
                is_image(&path)
            }
        })
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `per_class` small PNGs for each class under `root/split/`.
    pub fn write_folder(root: &Path, split: &str, classes: &[&str], per_class: usize, side: u32) {
        for (c, class) in classes.iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let img = image::RgbImage::from_fn(side, side, |x, y| {
                    image::Rgb([(c * 80) as u8, (x * 7 + i as u32) as u8, (y * 5) as u8])
                });
                img.save(dir.join(format!("{i:03}.png"))).unwrap();
            }
        }
    }

    #[test]
    fn loads_classes_in_order_and_resizes() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), "train", &["b_cat", "a_dog"], 3, 12);
        let ds = load_split(dir.path(), "train", 8, false).unwrap();
        assert_eq!(ds.classes, vec!["a_dog", "b_cat"]);
        assert_eq!(ds.labels, vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(ds.pixels.len(), 6 * 8 * 8 * 3);
        assert_eq!(find_root(dir.path()).unwrap(), dir.path());
    }

    #[test]
    fn unlabeled_folders_load_every_image_under_them() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), "photos", &["2024", "2025"], 2, 6);
        let ds = load_unlabeled(&dir.path().join("photos"), 4, false).unwrap();
        assert_eq!((ds.len(), ds.num_classes()), (4, 1));
        assert!(
            holds_images(&dir.path().join("photos")) && !holds_images(&dir.path().join("nothing"))
        );
    }

    #[test]
    fn balanced_subset_takes_equal_shares() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), "train", &["a", "b", "c"], 5, 4);
        let ds = load_split(dir.path(), "train", 4, false).unwrap();
        let sub = ds.balanced_subset(7, 1);
        let count = |c| sub.labels.iter().filter(|&&l| l == c).count();
        assert_eq!((count(0), count(1), count(2)), (3, 2, 2));
        assert_eq!(sub.balanced_subset(7, 1).len(), 7);
    }

    #[test]
    fn bad_inputs_name_the_file_or_folder() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            load_split(dir.path(), "train", 8, false).unwrap_err()
        );
        assert!(err.contains("missing split folder"), "{err}");
        std::fs::create_dir_all(dir.path().join("train/empty")).unwrap();
        let err = format!(
            "{:#}",
            load_split(dir.path(), "train", 8, false).unwrap_err()
        );
        assert!(
            err.contains("empty") && err.contains("holds no images"),
            "{err}"
        );
        std::fs::write(dir.path().join("train/empty/broken.jpg"), b"not a jpeg").unwrap();
        let err = format!(
            "{:#}",
            load_split(dir.path(), "train", 8, false).unwrap_err()
        );
        assert!(err.contains("broken.jpg"), "{err}");
        // --skip-bad leaves the broken file out and keeps the good ones.
        write_folder(dir.path(), "train", &["good"], 2, 4);
        let ds = load_split(dir.path(), "train", 4, true).unwrap();
        assert_eq!(ds.len(), 2);
        let err = format!("{:#}", find_root(&dir.path().join("nope")).unwrap_err());
        assert!(err.contains("nope"), "{err}");
    }
}
