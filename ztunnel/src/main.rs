use std::process::ExitCode;

use clap::Parser;
use ztunnel::config::{Cli, Command};
use ztunnel::identity::LocalCa;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CreateCa { dir, trust_domain } => {
            match LocalCa::create_root(&dir, &trust_domain) {
                Ok((cert, key)) => {
                    println!("wrote {} and {}", cert.display(), key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ztunnel: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(config) => {
            if let Err(e) = config.validate() {
                eprintln!("ztunnel: {e}");
                return ExitCode::from(2);
            }
            let set_filter = match ztunnel::logging::init(&config.log, config.log_format) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("ztunnel: {e}");
                    return ExitCode::from(2);
                }
            };
            tracing::info!(config = ?config, "starting");
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
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

// glibc malloc returns and re-faults the large per-frame buffers of bulk transfers (page
// faults were ~7% of a busy tunnel's CPU); mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
