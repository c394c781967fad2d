//! The `ringway` binary: flags -> Config -> run. Exit status 2 for a bad flag, 1 for a
//! start-up failure (busy port, unresolvable backend, no io_uring), 0 after a clean stop.

use std::process::ExitCode;

use argh::FromArgs;
use ringway::config::{Config, Flags};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut flags = match Flags::from_args(&["ringway"], argv.get(1..).unwrap_or_default()) {
        Ok(flags) => flags,
        Err(early) => {
            return if early.status.is_ok() {
                print!("{}", early.output);
                ExitCode::SUCCESS
            } else {
                let message = early.output.trim().replace('\n', " ");
                eprintln!("ringway: {message} (see ringway --help)");
                ExitCode::from(2)
            };
        }
    };
    if flags.version {
        // The commit comes from build.rs: `unknown` when built outside a git checkout.
        println!(
            "ringway {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            env!("RINGWAY_GIT_COMMIT")
        );
        return ExitCode::SUCCESS;
    }
    if flags.splice.is_none() {
        // So a whole test run (or a service) can force the buffered path without new flags.
        flags.splice = std::env::var("RINGWAY_SPLICE").ok();
    }
    let config = match Config::from_flags(&flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ringway: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match ringway::control::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringway: {e}");
            ExitCode::from(1)
        }
    }
}
