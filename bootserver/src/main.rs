//! `bootserver`: DHCP, TFTP and HTTP for network-booting the diskcast agent.

use clap::{Parser, Subcommand, ValueEnum};
use diskcast_bootserver::config::{Config, DhcpMode};
use diskcast_bootserver::ipxe::BootScript;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "bootserver",
    version,
    about = "diskcast bootserver: network-boot bare machines into the diskcast agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Full,
    Proxy,
}

#[derive(Debug, clap::Args)]
struct ConfigArgs {
    /// The TOML configuration (see bootserver.example.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Override the config's interface.
    #[arg(long)]
    interface: Option<String>,
    /// Override the config's DHCP mode.
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Override the config's state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve DHCP, TFTP and HTTP until stopped.
    Serve(ConfigArgs),
    /// Check the configuration and exit.
    CheckConfig(ConfigArgs),
    /// Print the iPXE script a machine would get.
    Script {
        #[command(flatten)]
        config: ConfigArgs,
        /// The machine's MAC address.
        #[arg(long)]
        mac: String,
        /// The server address to put in the script.
        #[arg(long, default_value = "10.77.0.1")]
        server: Ipv4Addr,
    },
}

fn load(args: &ConfigArgs) -> Result<Config, diskcast_bootserver::config::ConfigError> {
    let mut config = Config::load(&args.config)?;
    if let Some(interface) = &args.interface {
        config.interface = interface.clone();
    }
    if let Some(mode) = args.mode {
        config.dhcp.mode = match mode {
            ModeArg::Full => DhcpMode::Full,
            ModeArg::Proxy => DhcpMode::Proxy,
        };
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Caught and counted as a malformed packet; the default hook would print it as a crash.
        if !diskcast_agent::dhcp::panic_is_guarded() {
            default_hook(info);
        }
    }));
    let result: Result<(), Box<dyn std::error::Error>> = (|| match cli.command {
        Command::Serve(args) => Ok(diskcast_bootserver::serve::run(load(&args)?)?),
        Command::CheckConfig(args) => {
            let config = load(&args)?;
            println!(
                "{}: ok ({:?} mode on {})",
                args.config.display(),
                config.dhcp.mode,
                config.interface
            );
            Ok(())
        }
        Command::Script {
            config,
            mac,
            server,
        } => {
            let loaded = load(&config)?;
            let mac = diskcast_bootserver::config::canonical_mac(&mac)
                .ok_or(format!("{mac:?} is not a MAC address"))?;
            let agent = loaded.agent_config_for(Some(&mac), Some(server))?;
            let script = BootScript {
                base_url: format!("http://{server}:{}", loaded.http_port),
                mac,
                kernel_args: loaded.boot.kernel_args.clone(),
                agent,
            };
            print!("{}", script.render());
            Ok(())
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", diskcast_agent::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
