//! `byol data download` and `byol train --dataset`: the official CIFAR archives over HTTP(S),
//! resumed after a broken transfer, MD5-checked, unpacked once (torchvision's `download=True`).

use anyhow::{Context, Result, bail};
use md5::{Digest, Md5};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The datasets `byol` can fetch by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KnownDataset {
    Cifar10,
    Cifar100,
}

/// Where an archive comes from and what it must hash to.
#[derive(Clone, Debug)]
pub struct Remote {
    pub url: String,
    /// Lower-case hex MD5 of the whole archive.
    pub md5: String,
    /// File name the archive is kept under (next to the unpacked folder).
    pub archive_name: String,
    /// Folder the archive is unpacked into.
    pub folder: String,
}

impl KnownDataset {
    /// The binary versions published on the CIFAR page, with their published MD5 sums.
    pub fn remote(self) -> Remote {
        let (file, md5, folder) = match self {
            KnownDataset::Cifar10 => (
                "cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
                "cifar10",
            ),
            KnownDataset::Cifar100 => (
                "cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
                "cifar100",
            ),
        };
        Remote {
            url: format!("https://www.cs.toronto.edu/~kriz/{file}"),
            md5: md5.into(),
            archive_name: file.into(),
            folder: folder.into(),
        }
    }
}

/// Broken transfers are resumed this many times within one call before giving up (the
/// `.part` file stays, so the next call resumes again).
const ATTEMPTS: usize = 4;

/// Makes `dir/<folder>` hold the unpacked dataset and returns it: nothing to do when it is
/// already there; an archive already in `dir` (downloaded by hand, say) is verified and used;
/// otherwise it is downloaded, resuming a `.part` file a broken transfer left.
pub fn fetch(remote: &Remote, dir: &Path, progress: bool) -> Result<PathBuf> {
    let dest = dir.join(&remote.folder);
    if dest.is_dir() {
        return Ok(dest);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data folder {}", dir.display()))?;
    let archive = dir.join(&remote.archive_name);
    if !archive.is_file() {
        let part = dir.join(format!("{}.part", remote.archive_name));
        download_resuming(&remote.url, &part, progress).with_context(|| {
            format!(
                "cannot fetch {} into {} (without a network: put the archive there by hand, \
                 or pass --data with an unpacked copy)",
                remote.archive_name,
                dir.display()
            )
        })?;
        check_md5(&part, &remote.md5, &remote.url)?;
        std::fs::rename(&part, &archive)
            .with_context(|| format!("cannot move the download to {}", archive.display()))?;
    } else {
        check_md5(&archive, &remote.md5, &archive.display().to_string())?;
    }
    super::archive::unpack_into(&archive, &dest)?;
    // The archive is kept: a later `fetch` into a fresh folder reuses it without the network.
    Ok(dest)
}

/// A `.part` that fails the checksum is deleted, so the next attempt starts afresh.
fn check_md5(path: &Path, expected: &str, source: &str) -> Result<()> {
    let got = md5_file(path)?;
    if got != expected.to_ascii_lowercase() {
        if path.extension().is_some_and(|e| e == "part") {
            let _ = std::fs::remove_file(path);
        }
        bail!(
            "MD5 mismatch for {source}: expected {expected}, got {got} (corrupt or not the \
             official archive; {} was removed, run again to download afresh)",
            path.display()
        );
    }
    Ok(())
}

pub fn md5_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn download_resuming(url: &str, part: &Path, progress: bool) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_recv_body(None)
        .http_status_as_error(false)
        .build()
        .into();
    let mut last_error = None;
    for attempt in 1..=ATTEMPTS {
        match download_once(&agent, url, part, progress) {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Broken(e)) => {
                let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
                tracing::warn!(
                    "download of {url} broke after {have} bytes (attempt {attempt}/{ATTEMPTS}): {e:#}"
                );
                last_error = Some(e);
            }
        }
    }
    Err(last_error.expect("at least one attempt"))
        .with_context(|| format!("download of {url} kept breaking; run again to resume it"))
}

enum Failure {
    /// Worth resuming: the connection dropped mid-body.
    Broken(anyhow::Error),
    /// Not worth retrying: offline, refused, not found.
    Fatal(anyhow::Error),
}

fn download_once(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    progress: bool,
) -> Result<(), Failure> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let response = request
        .call()
        .map_err(|e| Failure::Fatal(anyhow::anyhow!("cannot download {url}: {e} (offline?)")))?;
    let status = response.status().as_u16();
    let (append, total) = match status {
        206 => (
            true,
            content_range_total(&response).or(content_length(&response).map(|l| l + have)),
        ),
        200 => (false, content_length(&response)),
        // The `.part` already holds everything: the checksum decides.
        416 if have > 0 => return Ok(()),
        _ => {
            return Err(Failure::Fatal(anyhow::anyhow!(
                "cannot download {url}: HTTP {status}"
            )));
        }
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .with_context(|| format!("cannot write {}", part.display()))
        .map_err(Failure::Fatal)?;
    let mut out = std::io::BufWriter::new(file);
    let start = if append { have } else { 0 };
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
        bar.set_position(start);
        bar
    });
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut written = start;
    let result = loop {
        match body.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]) {
                    break Err(Failure::Fatal(
                        anyhow::Error::new(e).context(format!("cannot write {}", part.display())),
                    ));
                }
                written += n as u64;
                if let Some(bar) = &bar {
                    bar.set_position(written);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(Failure::Broken(anyhow::Error::new(e))),
        }
    };
    // What arrived is kept even when the transfer broke: the next attempt resumes from it.
    out.flush()
        .and_then(|()| out.get_ref().sync_all())
        .with_context(|| format!("cannot write {}", part.display()))
        .map_err(Failure::Fatal)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result?;
    match total {
        Some(total) if written < total => Err(Failure::Broken(anyhow::anyhow!(
            "connection closed at {written} of {total} bytes"
        ))),
        _ => Ok(()),
    }
}

fn content_length(response: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    response
        .headers()
        .get("content-length")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The total size from `Content-Range: bytes START-END/TOTAL`.
fn content_range_total(response: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    let value = response.headers().get("content-range")?.to_str().ok()?;
    value.rsplit('/').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_of_known_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(md5_file(&path).unwrap(), "d41d8cd98f00b204e9800998ecf8427e");
        std::fs::write(&path, b"The quick brown fox jumps over the lazy dog").unwrap();
        assert_eq!(md5_file(&path).unwrap(), "9e107d9d372bb6826bd81d3542a419d6");
    }

    #[test]
    fn an_archive_put_in_the_folder_by_hand_is_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Remote {
            url: "http://127.0.0.1:9/never-used.tar.gz".into(),
            md5: "00000000000000000000000000000000".into(),
            archive_name: "x.tar.gz".into(),
            folder: "x".into(),
        };
        std::fs::write(dir.path().join("x.tar.gz"), b"not the archive").unwrap();
        let err = format!("{:#}", fetch(&remote, dir.path(), false).unwrap_err());
        assert!(
            err.contains("MD5 mismatch") && err.contains("x.tar.gz"),
            "{err}"
        );
        // A file the user put there is theirs: it is not deleted.
        assert!(dir.path().join("x.tar.gz").is_file());
    }
}
