use clap::Parser;
use diskcast_initramfs::{build, Spec, DEFAULT_MODULES};
use std::path::PathBuf;
use std::process::ExitCode;

/// Build the diskcast initramfs (gzip-compressed newc cpio).
#[derive(Debug, Parser)]
#[command(name = "diskcast-initramfs", version)]
struct Cli {
    /// Root of an extracted kernel package (holds lib/modules/<version>).
    #[arg(long)]
    kernel_root: PathBuf,
    /// Kernel version; default: the only one under lib/modules.
    #[arg(long)]
    kernel_version: Option<String>,
    /// The static agent binary to install as /init.
    #[arg(long)]
    agent: PathBuf,
    /// Output file.
    #[arg(long, short)]
    output: PathBuf,
    /// Extra modules to include (with their dependencies).
    #[arg(long = "module", value_name = "NAME")]
    extra_modules: Vec<String>,
    /// Leave out the default lab module set.
    #[arg(long)]
    no_default_modules: bool,
    /// Leave this module out even if the set or a dependency names it (to see what a machine
    /// without its driver says).
    #[arg(long = "without", value_name = "NAME")]
    without: Vec<String>,
    /// Add the files under DIR to /lib/firmware (keeping their paths below DIR), for drivers
    /// that need firmware: the agent names a missing file and its Debian package.
    #[arg(long = "firmware", value_name = "DIR")]
    firmware: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger_lite();
    let mut modules: Vec<String> = if cli.no_default_modules {
        Vec::new()
    } else {
        DEFAULT_MODULES.iter().map(|m| m.to_string()).collect()
    };
    modules.extend(cli.extra_modules);
    let spec = Spec {
        kernel_root: cli.kernel_root,
        version: cli.kernel_version,
        agent: cli.agent,
        modules,
        without: cli.without,
        firmware: cli.firmware,
    };
    match build(&spec, &cli.output) {
        Ok(summary) => {
            println!(
                "initramfs {}: kernel {}, {} modules, {} firmware files, {:.1} MiB uncompressed, {:.1} MiB compressed",
                cli.output.display(),
                summary.version,
                summary.modules.len(),
                summary.firmware_files,
                summary.uncompressed_bytes as f64 / 1048576.0,
                summary.compressed_bytes as f64 / 1048576.0
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", diskcast_proto::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn env_logger_lite() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}
