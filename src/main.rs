use clap::Parser;
use std::io::IsTerminal;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            // cubecl's autotuner logs each kernel shape it times on a GPU (tens of lines at
            // the first steps); `BYOL_LOG=info` shows them.
            tracing_subscriber::EnvFilter::try_from_env("BYOL_LOG")
                .unwrap_or_else(|_| "info,cubecl_runtime::tune=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = byol::cli::Cli::parse();
    // On a worker of rayon's global pool rather than the main thread: each parallel operation
    // of the step (hundreds a step) then splits between this worker and the others, instead
    // of waking a worker from outside the pool and sleeping until the pool is done (width
    // 0.25: the step 1.05x). The data loader has a pool of its own, so that this worker does
    // not pick up augmentation jobs while it waits in a join.
    match rayon::scope(|_| byol::cli::run(cli)) {
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
/// One arena for all threads: the step runs on a rayon worker (see `main`), and a thread's
/// own arena gives memory back as its heap shrinks, whatever the trim threshold (`byol
/// train` at width 1: 7.8x the page faults, 0.85x the speed).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; it runs before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
