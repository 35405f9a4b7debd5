//! `byol data download` and `byol train --dataset` against a small HTTP server on 127.0.0.1
//! serving a generated CIFAR-10-shaped archive: a transfer that breaks half-way (resumed with a
//! Range request), a corrupt archive (MD5 error), a missing file (HTTP 404), no server at all.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A gzipped tar of `cifar-10-batches-bin/` with a few records per batch file.
fn cifar10_archive() -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("cifar-10-batches-bin/{name}"), bytes)
            .unwrap();
    };
    let records = |seed: u8, count: usize| -> Vec<u8> {
        (0..count)
            .flat_map(|i| {
                let label = (i % 10) as u8;
                std::iter::once(label).chain((0..3072).map(move |p| {
                    (p as u8).wrapping_mul(31) ^ seed.wrapping_add(i as u8 * 7) ^ (label * 25)
                }))
            })
            .collect()
    };
    for b in 1..=5u8 {
        add(&format!("data_batch_{b}.bin"), &records(b, 10));
    }
    add("test_batch.bin", &records(9, 10));
    add(
        "batches.meta.txt",
        b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n",
    );
    builder.into_inner().unwrap().finish().unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves `/good.tar.gz` (the first response cut off half-way when `break_first` is set),
/// `/corrupt.tar.gz` (one byte changed) and 404 for anything else; records each request line
/// with its Range header.
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(archive: Vec<u8>, break_first: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let broken = Arc::new(AtomicBool::new(!break_first));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve(stream, &archive, &log, &broken);
            }
        });
        Server { port, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, archive: &[u8], log: &Mutex<Vec<String>>, broken: &AtomicBool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut range_start = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_start = value.trim().trim_end_matches('-').parse::<usize>().ok();
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock()
        .unwrap()
        .push(format!("{path} range={range_start:?}"));
    let mut out = stream;
    let body: Vec<u8> = match path.as_str() {
        "/good.tar.gz" => archive.to_vec(),
        "/corrupt.tar.gz" => {
            let mut bytes = archive.to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            bytes
        }
        _ => {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            return;
        }
    };
    let start = range_start.unwrap_or(0).min(body.len());
    let head = match range_start {
        Some(_) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
            body.len() - start,
            body.len() - 1,
            body.len()
        ),
        None => format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ),
    };
    out.write_all(head.as_bytes()).unwrap();
    let rest = &body[start..];
    if !broken.swap(true, Ordering::SeqCst) {
        // Cut the first transfer off half-way through the body.
        let _ = out.write_all(&rest[..rest.len() / 2]);
        let _ = out.shutdown(std::net::Shutdown::Both);
        return;
    }
    let _ = out.write_all(rest);
}

fn byol(args: &[&str], data_cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_byol"))
        .args(args)
        .env("BYOL_DATA", data_cache)
        .output()
        .unwrap()
}

#[test]
fn download_resumes_a_broken_transfer_and_training_finds_the_cached_dataset() {
    let archive = cifar10_archive();
    let md5 = md5_hex(&archive);
    let server = Server::start(archive, true);
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("good.tar.gz");
    let out = byol(
        &["data", "download", "cifar10", "--url", &url, "--md5", &md5],
        cache.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0], "/good.tar.gz range=None");
    assert!(
        requests[1].starts_with("/good.tar.gz range=Some("),
        "the second request resumes: {requests:?}"
    );
    let batches = cache.path().join("cifar10/cifar-10-batches-bin");
    assert_eq!(
        std::fs::metadata(batches.join("data_batch_1.bin"))
            .unwrap()
            .len(),
        10 * 3073
    );
    assert!(!cache.path().join("cifar-10-binary.tar.gz.part").exists());

    // Already there: no second download.
    let again = byol(&["data", "download", "cifar10"], cache.path());
    assert!(again.status.success());
    assert_eq!(server.requests().len(), 2);

    // `--dataset cifar10` finds it in $BYOL_DATA.
    let run = cache.path().join("run");
    let out = byol(
        &[
            "train",
            "--dataset",
            "cifar10",
            "--out",
            run.to_str().unwrap(),
            "--width",
            "0.0625",
            "--image-size",
            "16",
            "--batch-size",
            "10",
            "--epochs",
            "1",
            "--knn-k",
            "5",
            "--quiet",
        ],
        cache.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("\"knn_top1\""), "{summary}");
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn corrupt_missing_and_unreachable_archives_are_clear_errors() {
    let archive = cifar10_archive();
    let md5 = md5_hex(&archive);
    let server = Server::start(archive, false);
    let cache = tempfile::tempdir().unwrap();

    let url = server.url("corrupt.tar.gz");
    let out = byol(
        &["data", "download", "cifar10", "--url", &url, "--md5", &md5],
        cache.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MD5 mismatch") && err.contains(&url) && err.contains(&md5),
        "{err}"
    );
    assert!(!cache.path().join("cifar-10-binary.tar.gz.part").exists());
    assert!(!cache.path().join("cifar10").exists());

    let url = server.url("nothing.tar.gz");
    let out = byol(
        &["data", "download", "cifar100", "--url", &url],
        cache.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 404") && err.contains(&url), "{err}");

    // Nothing listens on port 1: what a user sees offline.
    let url = "http://127.0.0.1:1/cifar-10-binary.tar.gz";
    let out = byol(&["data", "download", "cifar10", "--url", url], cache.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot download") && err.contains(url) && err.contains("offline"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
