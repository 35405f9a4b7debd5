//! `--data` may name a `.tar.gz` of an image folder: it is unpacked once into a data cache.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// `$BYOL_DATA`, else `$XDG_CACHE_HOME/byol`, else `~/.cache/byol`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BYOL_DATA") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("byol");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("byol")
}

pub fn is_archive(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Unpacks `archive` under `cache` (once: a finished unpack is reused) and returns the folder.
/// The unpack goes to a temporary folder renamed into place, so an interrupted one is redone.
pub fn unpack_cached(archive: &Path, cache: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(archive)
        .with_context(|| format!("cannot read archive {}", archive.display()))?;
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("data");
    let stem = name.trim_end_matches(".tar.gz").trim_end_matches(".tgz");
    let dest = cache.join(format!("{stem}-{}", meta.len()));
    if dest.is_dir() {
        return Ok(dest);
    }
    unpack_into(archive, &dest)?;
    Ok(dest)
}

/// Unpacks `archive` into the new folder `dest` through a temporary sibling renamed into
/// place, so an interrupted unpack leaves nothing that looks finished. A `dest` that another
/// process finished first is kept.
pub fn unpack_into(archive: &Path, dest: &Path) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create data folder {}", parent.display()))?;
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("data");
    let tmp = parent.join(format!(".{name}.unpacking-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let file = std::fs::File::open(archive)
        .with_context(|| format!("cannot open archive {}", archive.display()))?;
    tracing::info!("unpacking {} into {}", archive.display(), dest.display());
    let unpacked =
        tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file))).unpack(&tmp);
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot unpack archive {} (corrupt or not a .tar.gz?)",
                archive.display()
            )
        });
    }
    match std::fs::rename(&tmp, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot move unpacked data to {}", dest.display()))
        }
    }
}

/// A data folder from `--data`: the folder itself, or the cached unpack of an archive.
pub fn resolve_data_dir(data: &Path) -> Result<PathBuf> {
    if is_archive(data) {
        unpack_cached(data, &cache_dir())
    } else {
        Ok(data.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_once_and_reports_corrupt_archives() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src/set/train/a");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("x.txt"), b"hello").unwrap();
        let archive = dir.path().join("set.tar.gz");
        {
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&archive).unwrap(),
                Default::default(),
            );
            let mut builder = tar::Builder::new(gz);
            builder
                .append_dir_all("set", dir.path().join("src/set"))
                .unwrap();
            builder.into_inner().unwrap().finish().unwrap();
        }
        let cache = dir.path().join("cache");
        let out = unpack_cached(&archive, &cache).unwrap();
        assert_eq!(
            std::fs::read(out.join("set/train/a/x.txt")).unwrap(),
            b"hello"
        );
        assert_eq!(unpack_cached(&archive, &cache).unwrap(), out);

        let bad = dir.path().join("bad.tar.gz");
        std::fs::write(&bad, b"garbage").unwrap();
        let err = format!("{:#}", unpack_cached(&bad, &cache).unwrap_err());
        assert!(err.contains("bad.tar.gz"), "{err}");
    }
}
