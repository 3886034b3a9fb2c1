use std::process::ExitCode;

use clap::Parser;
use ztunnel::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(config) => {
            if let Err(e) = config.validate() {
                eprintln!("ztunnel: {e}");
                return ExitCode::from(2);
            }
            // Held until exit: dropping it flushes the log lines still queued.
            let (set_filter, _log_writer) =
                match ztunnel::logging::init(&config.log, config.log_format) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("ztunnel: {e}");
                        return ExitCode::from(2);
                    }
                };
            tracing::info!(config = ?config, "starting");
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads)
                .enable_all()
                .on_thread_park(return_freed_memory)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ztunnel: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(ztunnel::app::run(*config, set_filter)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("ztunnel: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// When a runtime thread runs out of work, at most once a second: hands the memory its
/// allocator heap holds freed back to the OS. Without it, a tunnel that held 10,000
/// connections kept about 40 MB after they closed (each thread's heap keeps freed pages for
/// reuse; they are returned only when that thread collects).
fn return_freed_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < Duration::from_secs(1) => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: collects this thread's own heap; no pointers are handed over.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// mimalloc's `arena_eager_commit` (option 4 of the bundled v3): on, every arena the
/// allocator reserves is committed up front, which made an idle tunnel 22.7 MB instead of 9.8
/// and a held connection cost 27 KiB instead of 13 (`weft-bench load`). Off, memory is committed
/// as it is used. The option is read when mimalloc starts, in its own constructor (priority
/// 101), before `main`: this one runs just ahead of it.
#[used]
#[unsafe(link_section = ".init_array.00100")]
static COMMIT_MEMORY_LAZILY: extern "C" fn() = {
    extern "C" fn commit_memory_lazily() {
        const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
        // SAFETY: sets a plain option, before mimalloc starts and before any thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    commit_memory_lazily
};

// glibc malloc returns and re-faults the large per-frame buffers of bulk transfers (page
// faults were ~7% of a busy tunnel's CPU); mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
