//! The `agent` binary: PID 1 of the diskcast initramfs, or a CLI on any Linux host.

use clap::{Parser, Subcommand};
use diskcast_agent::cmdline::BootConfig;
use diskcast_agent::inventory::Inventory;
use diskcast_agent::{logging, pid1};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "diskcast agent: network disk imaging"
)]
struct Cli {
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "info")]
    log: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this machine's disks and network interfaces.
    Inventory {
        /// Root of sysfs (for tests on a copied tree).
        #[arg(long, default_value = "/sys")]
        sys: PathBuf,
        #[arg(long, default_value = "/dev")]
        dev: PathBuf,
    },
    /// Parse a kernel command line (default: /proc/cmdline) and print the diskcast settings.
    Cmdline {
        /// The command line to parse instead of /proc/cmdline.
        line: Option<String>,
    },
    /// Run as PID 1 (what happens automatically when the kernel starts the agent as /init).
    Init,
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        pid1::run();
    }
    let cli = Cli::parse();
    logging::init(cli.log, false);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            pid1::report(e.as_ref());
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Inventory { sys, dev } => {
            print!("{}", Inventory::read(&sys, &dev));
            Ok(())
        }
        Command::Cmdline { line } => {
            let line = match line {
                Some(line) => line,
                None => std::fs::read_to_string("/proc/cmdline")?,
            };
            let config = BootConfig::parse(&line)?;
            println!("{config:#?}");
            println!("rendered: {}", config.render());
            Ok(())
        }
        Command::Init => pid1::run(),
    }
}
