use clap::Parser;
use std::io::IsTerminal;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BYOL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match byol::cli::run(byol::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Has glibc keep freed memory for the next allocation instead of handing it back to the
/// kernel. A training step allocates and frees the same large activation buffers every step;
/// glibc serves blocks over 32 MiB with a fresh `mmap` and returns them on free (and trims the
/// heap top over 128 KiB), so every step page-faulted and zeroed them anew: 5-10% of the
/// step. Served from the heap, they are reused (bf16 width 1: 1.06x, peak RSS 2% lower).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; it runs before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
