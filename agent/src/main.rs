//! The `agent` binary: PID 1 of the diskcast initramfs, or a CLI on any Linux host.

use clap::{Parser, Subcommand};
use diskcast_agent::cmdline::{Blocks, BootConfig};
use diskcast_agent::imaging::{self, receive};
use diskcast_agent::inventory::Inventory;
use diskcast_agent::{logging, pid1};
use diskcast_proto::units::{human_size, Rate};
use diskcast_proto::wire::{DEFAULT_GROUP, DEFAULT_PORT};
use diskcast_transport::present;
use diskcast_transport::send::SendOptions;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
        /// Apply a settings file (a stick's diskcast.cfg) over the command line and check it.
        #[arg(long)]
        settings_file: Option<PathBuf>,
    },
    /// Run as PID 1 (what happens automatically when the kernel starts the agent as /init);
    /// refused anywhere else.
    Init,
    /// Multicast a disk or image file to every receiver on the network.
    Send(SendArgs),
    /// Receive an image from a multicast session onto a disk or image file.
    Receive(ReceiveArgs),
    /// Carry a session from a sender on another subnet (across a router that forwards no
    /// multicast) into this one: receive it by unicast and re-multicast it to local receivers,
    /// serving their repairs.
    Relay(RelayArgs),
    /// Upload a disk or image file into a bootserver's image store.
    Capture(CaptureArgs),
    /// Signing keys: make one, or show a key file's public key.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Make a new key file (readable by its owner only) and print its public key.
    New { file: PathBuf },
    /// Print the public key of a key file (what receivers `--trust`).
    Show { file: PathBuf },
}

#[derive(Debug, clap::Args)]
struct CaptureArgs {
    /// Block device or image file to capture.
    source: PathBuf,
    /// The bootserver: ADDRESS or ADDRESS:PORT (its HTTP port, 8080 by default), or
    /// `https://ADDRESS:PORT` (its HTTPS API, with --pin or --ca).
    #[arg(long)]
    to: String,
    /// With an https:// server: the SHA-256 fingerprint of its certificate (`bootserver key
    /// https` prints it); nothing is sent to a server presenting another.
    #[arg(long, conflicts_with = "ca")]
    pin: Option<String>,
    /// With an https:// server: a PEM file of CA certificates that issued its certificate for
    /// its address.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Name of the image in the store (default: HOSTNAME-SOURCE, e.g. `lab12-sda`).
    #[arg(long)]
    name: Option<String>,
    /// zstd level (1 fastest ... 19 smallest).
    #[arg(long, default_value_t = diskcast_proto::codec::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
    #[command(flatten)]
    blocks: BlocksArgs,
    /// The store's admin token (`bootserver token`): uploads without one are refused. Read
    /// from FILE with `--token @FILE` (keeps it out of the process list).
    #[arg(long)]
    token: String,
}

/// Which blocks of a source are read: by default the blocks its file systems use.
#[derive(Debug, clap::Args)]
struct BlocksArgs {
    /// Read every block, not only those the file systems use (only all-zero chunks are skipped).
    #[arg(long, conflicts_with = "trust_unclean_fs")]
    all_blocks: bool,
    /// Map file systems that were not cleanly unmounted instead of reading them whole (only for
    /// disks known to be consistent: blocks a journal replay would write are missed).
    #[arg(long)]
    trust_unclean_fs: bool,
}

impl BlocksArgs {
    fn blocks(&self) -> Blocks {
        match (self.all_blocks, self.trust_unclean_fs) {
            (true, _) => Blocks::All,
            (false, true) => Blocks::UsedTrustUnclean,
            (false, false) => Blocks::Used,
        }
    }
}

#[derive(Debug, clap::Args)]
struct SessionArgs {
    /// Network interface (default: the first with an IPv4 address).
    #[arg(long, short)]
    interface: Option<String>,
    /// Multicast group.
    #[arg(long, default_value_t = DEFAULT_GROUP)]
    group: Ipv4Addr,
    /// UDP port of the group.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
}

#[derive(Debug, clap::Args)]
struct SendArgs {
    /// Block device or image file to send.
    source: PathBuf,
    #[command(flatten)]
    session: SessionArgs,
    /// Upper bound of the data rate, in MB/s (the sender adapts below it when receivers overflow
    /// or lose most datagrams).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// MB/s: the lowest rate the sender slows down to for a receiver that loses most datagrams;
    /// one that still does there is dropped.
    #[arg(long, default_value_t = 10.0)]
    min_rate: f64,
    /// Start once this many receivers joined.
    #[arg(long, default_value_t = 1)]
    min_receivers: u32,
    /// ...or this many seconds after starting, with whoever joined.
    #[arg(long)]
    start_timeout: Option<u64>,
    /// Drop receivers not done this many seconds after the data started (default: wait for all).
    #[arg(long)]
    deadline: Option<u64>,
    /// Drop a receiver silent for this many seconds.
    #[arg(long, default_value_t = 30)]
    receiver_timeout: u64,
    /// Chunk size in bytes (multiple of 4096).
    #[arg(long, default_value_t = diskcast_proto::manifest::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Multicast TTL (1: this LAN only).
    #[arg(long, default_value_t = 1)]
    ttl: u8,
    /// Parity sent with every chunk before anybody asks, as a fraction of its blocks (e.g. 0.05
    /// on a network known to lose about 5 %); 0 sends parity only for reported losses.
    #[arg(long, default_value_t = 0.0)]
    proactive_parity: f64,
    /// Repair with exact blocks only, never parity (parity spares the link when receivers lose
    /// different blocks, and costs each receiver the decoding).
    #[arg(long)]
    no_parity: bool,
    /// Send chunks raw instead of compressing them (with zstd, on every core, where it pays).
    #[arg(long)]
    no_compress: bool,
    #[command(flatten)]
    blocks: BlocksArgs,
    /// Sign the session with this key file (`agent key new`); receivers `--trust` its public
    /// key. Without it the session is unsigned and only `--trust-any` receivers join.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Serve relays on this UDP port (`agent relay --upstream ADDRESS:PORT` on subnets the
    /// multicast does not reach); by default the sender's port is chosen by the system.
    #[arg(long)]
    relay_port: Option<u16>,
    /// Data bytes per datagram (even, 512 to 65480), or `mtu`: as much as this interface's MTU
    /// takes without IP fragments (8896 at a jumbo MTU of 9000), for a LAN where every
    /// receiver has that MTU too. The default, 1408, fits a 1500-byte MTU.
    #[arg(long, value_parser = diskcast_transport::send::parse_block_size)]
    block_size: Option<diskcast_transport::send::BlockSize>,
}

#[derive(Debug, clap::Args)]
struct RelayArgs {
    /// The sender: ADDRESS:PORT (its `--relay-port`).
    #[arg(long)]
    upstream: std::net::SocketAddr,
    /// The local interface, group and port to re-multicast on.
    #[command(flatten)]
    session: SessionArgs,
    /// Multicast TTL on the local subnet.
    #[arg(long, default_value_t = 1)]
    ttl: u8,
    /// Name shown at the sender (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Start the local data once this many local receivers joined...
    #[arg(long, default_value_t = 1)]
    min_receivers: u32,
    /// ...or this many seconds after the manifest arrived, with whoever joined.
    #[arg(long)]
    start_timeout: Option<u64>,
    /// Upper bound of the local data rate, in MB/s.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Give up if no session is announced within this many seconds.
    #[arg(long)]
    wait: Option<u64>,
    /// Fail when the sender is silent for this many seconds.
    #[arg(long, default_value_t = 30)]
    sender_timeout: u64,
    /// Drop a local receiver silent for this many seconds.
    #[arg(long, default_value_t = 30)]
    receiver_timeout: u64,
    /// Directory of the spool file that holds the relayed chunks (deleted at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    spool_dir: PathBuf,
    /// Relay only sessions signed by this public key (as `receive --trust`).
    #[arg(long, value_name = "KEY", required_unless_present = "trust_any")]
    trust: Vec<String>,
    /// Relay any session, signed or not (the local receivers still check it themselves).
    #[arg(long, conflicts_with = "trust")]
    trust_any: bool,
}

#[derive(Debug, clap::Args)]
struct ReceiveArgs {
    /// Block device or image file to write.
    target: PathBuf,
    #[command(flatten)]
    session: SessionArgs,
    /// Name shown at the sender (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Give up if no session is announced within this many seconds.
    #[arg(long)]
    wait: Option<u64>,
    /// Fail when the sender is silent for this many seconds.
    #[arg(long, default_value_t = 30)]
    sender_timeout: u64,
    /// On a block device larger than the image, extend the last GPT partition to the disk's
    /// end once the copy verified (the file system inside is grown by the installed system).
    #[arg(long)]
    grow_last_partition: bool,
    /// Discard (BLKDISCARD) the ranges the image skipped as unused, once the copy verified:
    /// SSDs and thin volumes free them.
    #[arg(long)]
    discard: bool,
    /// Join only sessions signed by this public key (64 hex digits: `agent key show`,
    /// `bootserver key show`); repeat it or separate keys by commas for several.
    #[arg(long, value_name = "KEY", required_unless_present = "trust_any")]
    trust: Vec<String>,
    /// Join any session, signed or not, from any host: only on a network nobody else can reach.
    #[arg(long, conflicts_with = "trust")]
    trust_any: bool,
}

/// `--trust` keys (each may list several, separated by commas), or `--trust-any`.
fn trust_from(keys: &[String], any: bool) -> Result<diskcast_proto::trust::Trust, String> {
    if any {
        return Ok(diskcast_proto::trust::Trust::Any);
    }
    let mut all = Vec::new();
    for text in keys {
        all.extend(
            diskcast_proto::trust::parse_key_list(text)
                .map_err(|e| format!("--trust {text:?}: {e}"))?,
        );
    }
    if all.is_empty() {
        return Err("--trust needs a public key (or give --trust-any)".into());
    }
    Ok(diskcast_proto::trust::Trust::Keys(all))
}

/// A `--token` value, or the first line of FILE for `@FILE`.
fn token_from(arg: &str) -> Result<String, String> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("reading the token from {path}: {e}")),
        None => Ok(arg.trim().to_string()),
    }
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
        Command::Cmdline {
            line,
            settings_file,
        } => {
            let line = match (line, &settings_file) {
                (Some(line), _) => line,
                (None, Some(_)) => String::new(),
                (None, None) => std::fs::read_to_string("/proc/cmdline")?,
            };
            let mut config = BootConfig::parse(&line)?;
            if let Some(path) = settings_file {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                config.apply_settings_file(&text).map_err(|e| {
                    format!("{}: {}", path.display(), diskcast_agent::error_chain(&e))
                })?;
            }
            println!("{config:#?}");
            println!("rendered: {}", config.render());
            Ok(())
        }
        Command::Init => {
            // As PID 1 main() never gets here; anywhere else init would mount, take interfaces
            // down and power the host off.
            Err("`agent init` runs only as PID 1 of the diskcast initramfs (the kernel starts it as /init)".into())
        }
        Command::Send(args) => {
            let mut opts = SendOptions::new(
                args.session.interface,
                args.session.group,
                args.session.port,
            );
            opts.ttl = args.ttl;
            opts.max_rate = Rate::from_mbps(args.rate);
            opts.min_rate = Rate::from_mbps(args.min_rate);
            opts.min_receivers = args.min_receivers;
            opts.start_timeout = args.start_timeout.map(Duration::from_secs);
            opts.deadline = args.deadline.map(Duration::from_secs);
            opts.receiver_timeout = Duration::from_secs(args.receiver_timeout);
            opts.chunk_size = args.chunk_size;
            if let Some(path) = &args.key {
                opts.signing_key = Some(diskcast_transport::keys::read_key(path)?);
            }
            if !(0.0..=0.25).contains(&args.proactive_parity) {
                return Err(format!(
                    "--proactive-parity {} is out of range: give a fraction from 0 to 0.25 of each chunk",
                    args.proactive_parity
                )
                .into());
            }
            opts.proactive_parity = args.proactive_parity;
            opts.parity = !args.no_parity;
            opts.relay_port = args.relay_port;
            opts.block_size = args.block_size.unwrap_or_default();
            if args.no_compress {
                opts.compress = None;
            }
            let summary =
                imaging::send::run_send(&args.source, &opts, args.blocks.blocks(), |progress| {
                    let now = std::time::Instant::now();
                    // Redrawn in place when stderr is a terminal, line by line into a log.
                    logging::console_live(&present::progress_table(progress, now));
                })?;
            print!("{}", summary.render());
            Ok(summary.result()?)
        }
        Command::Receive(args) => {
            let name = args.name.unwrap_or_else(host_name);
            let opts = receive::ReceiveOptions {
                target: args.target,
                interface: args.session.interface,
                group: args.session.group,
                port: args.session.port,
                name,
                wait_timeout: args.wait.map(Duration::from_secs),
                sender_timeout: Duration::from_secs(args.sender_timeout),
                grow_last_partition: args.grow_last_partition,
                discard: args.discard,
                trust: trust_from(&args.trust, args.trust_any)?,
                ..receive::ReceiveOptions::default()
            };
            // One line, redrawn in place on a terminal.
            receive::run_receive(&opts, |p| {
                logging::console_live(&[format!("receiving: {}", p.line())])
            })?;
            println!("copy verified: {}", opts.target.display());
            Ok(())
        }
        Command::Relay(args) => {
            let name = args.name.unwrap_or_else(host_name);
            let opts = diskcast_transport::relay::RelayOptions {
                interface: args.session.interface,
                group: args.session.group,
                port: args.session.port,
                ttl: args.ttl,
                sender: args.upstream,
                trust: trust_from(&args.trust, args.trust_any)?,
                id: diskcast_transport::random_u64(),
                name,
                min_receivers: args.min_receivers,
                start_timeout: args.start_timeout.map(Duration::from_secs),
                max_rate: Rate::from_mbps(args.rate),
                receiver_timeout: Duration::from_secs(args.receiver_timeout),
                sender_timeout: Duration::from_secs(args.sender_timeout),
                wait_timeout: args.wait.map(Duration::from_secs),
                spool_dir: args.spool_dir,
            };
            let summary = diskcast_transport::relay::run(&opts, |relay| {
                let now = std::time::Instant::now();
                let (done, total) = relay.upstream().progress();
                let mut lines = vec![format!("relay: upstream {done}/{total} chunks")];
                if let Some(local) = relay.local() {
                    lines.extend(present::progress_table(local, now));
                }
                logging::console_live(&lines);
            })?;
            print!("{}", diskcast_transport::relay::render(&summary));
            Ok(summary.result()?)
        }
        Command::Capture(args) => {
            let server = parse_endpoint(&args.to, args.pin.as_deref(), args.ca.as_deref())?;
            let name = match args.name {
                Some(name) => name,
                None => default_image_name(&host_name(), &args.source).ok_or(
                    "no usable default image name from the host and source names: give --name",
                )?,
            };
            let mut opts = imaging::capture::CaptureOptions::new(args.source, server, name);
            opts.level = args.level;
            opts.blocks = args.blocks.blocks();
            opts.source_machine = host_name();
            opts.source_disk = opts.source.display().to_string();
            opts.token = Some(token_from(&args.token)?);
            let mut last = std::time::Instant::now();
            let summary = imaging::capture::run_capture(&opts, |read, uploaded| {
                if last.elapsed() < Duration::from_secs(1) {
                    return;
                }
                last = std::time::Instant::now();
                eprintln!(
                    "capturing: {} read, {} uploaded",
                    human_size(read),
                    human_size(uploaded)
                );
            })?;
            println!(
                "captured {} ({} of data, {} uploaded) in {:.1} s; the store says: {}",
                opts.source.display(),
                human_size(summary.manifest.data_bytes()),
                human_size(summary.uploaded),
                summary.elapsed.as_secs_f64(),
                summary.server_says
            );
            Ok(())
        }
        Command::Key { command } => match command {
            KeyCommand::New { file } => {
                let key = diskcast_transport::keys::new_key()?;
                diskcast_transport::keys::write_key(&file, &key)?;
                eprintln!("made {} (secret: keep it private)", file.display());
                println!("{}", key.public());
                Ok(())
            }
            KeyCommand::Show { file } => {
                println!("{}", diskcast_transport::keys::read_key(&file)?.public());
                Ok(())
            }
        },
    }
}

/// `HOST-SOURCE` with every character an image name cannot hold replaced by `-`.
fn default_image_name(host: &str, source: &std::path::Path) -> Option<String> {
    let file = source.file_name()?.to_string_lossy();
    let raw = if host.is_empty() {
        file.to_string()
    } else {
        format!("{host}-{file}")
    };
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let name = name.trim_start_matches(['-', '.', '_']).to_string();
    diskcast_proto::image_file::valid_image_name(&name).then_some(name)
}

/// `--to` with `--pin` or `--ca`: plain HTTP for `ADDRESS[:PORT]` or `http://...`, HTTPS for
/// `https://ADDRESS:PORT`, which must say whom to trust (no "accept any certificate").
fn parse_endpoint(
    to: &str,
    pin: Option<&str>,
    ca: Option<&std::path::Path>,
) -> Result<diskcast_agent::http_client::Endpoint, String> {
    use diskcast_agent::http_client::{Endpoint, ServerTls};
    if let Some(rest) = to.strip_prefix("https://") {
        let addr: std::net::SocketAddr = rest.trim_end_matches('/').parse().map_err(|_| {
            format!("--to {to:?} is not https://ADDRESS:PORT (e.g. https://10.77.0.1:8443)")
        })?;
        let tls = match (pin, ca) {
            (Some(pin), _) => ServerTls::Pin(pin.parse().map_err(|e| {
                format!(
                    "--pin {pin:?}: {e}; expected {}",
                    diskcast_proto::trust::CertFingerprint::EXPECTED
                )
            })?),
            (None, Some(ca)) => {
                ServerTls::ca_file(ca).map_err(|e| diskcast_proto::error_chain(&e))?
            }
            (None, None) => {
                return Err(format!(
                    "--to {to} is HTTPS: give --pin SHA256 (`bootserver key https` on the server \
                     prints it) or --ca FILE, so that the token goes to that server only"
                ))
            }
        };
        return Ok(Endpoint { addr, tls });
    }
    if pin.is_some() || ca.is_some() {
        return Err(format!(
            "--pin and --ca are for an https:// server; --to {to} is plain HTTP"
        ));
    }
    parse_server(
        to.strip_prefix("http://")
            .unwrap_or(to)
            .trim_end_matches('/'),
    )
    .map(Endpoint::plain)
}

/// `ADDRESS` or `ADDRESS:PORT`; the port defaults to the bootserver's HTTP port.
fn parse_server(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.parse::<Ipv4Addr>()
        .map(|ip| std::net::SocketAddr::from((ip, 8080)))
        .map_err(|_| format!("--to {text:?} is not ADDRESS or ADDRESS:PORT (e.g. 10.77.0.1:8080)"))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_image_names_are_valid_or_absent() {
        let name = |host: &str, src: &str| default_image_name(host, std::path::Path::new(src));
        assert_eq!(name("lab12", "/dev/sda").as_deref(), Some("lab12-sda"));
        assert_eq!(
            name("", "/srv/disk image.raw").as_deref(),
            Some("disk-image.raw")
        );
        assert_eq!(
            name("pc 7", "/dev/nvme0n1").as_deref(),
            Some("pc-7-nvme0n1")
        );
        assert_eq!(name("", "/"), None);
        assert!(name(&"h".repeat(100), "/dev/sda").is_some_and(|n| n.len() == 64));
        assert_eq!(name("server", "/tmp/x").as_deref(), Some("server-x"));
    }

    #[test]
    fn https_servers_need_a_pin_or_a_ca_and_plain_ones_take_neither() {
        use diskcast_agent::http_client::ServerTls;
        let pin = "a1".repeat(32);
        let https = parse_endpoint("https://10.77.0.1:8443", Some(&pin), None).unwrap();
        assert!(matches!(https.tls, ServerTls::Pin(p) if p.to_string() == pin));
        assert_eq!(https.to_string(), "https://10.77.0.1:8443");
        let err = parse_endpoint("https://10.77.0.1:8443", None, None).unwrap_err();
        assert!(err.contains("--pin"), "{err}");
        let err = parse_endpoint("https://10.77.0.1:8443", Some("beef"), None).unwrap_err();
        assert!(err.contains("64 hex digits"), "{err}");
        let err = parse_endpoint("10.77.0.1", Some(&pin), None).unwrap_err();
        assert!(err.contains("plain HTTP"), "{err}");
        let plain = parse_endpoint("http://10.77.0.1:8080/", None, None).unwrap();
        assert!(matches!(plain.tls, ServerTls::Plain));
        assert_eq!(plain.to_string(), "http://10.77.0.1:8080");
        assert_eq!(
            parse_endpoint("10.77.0.1", None, None).unwrap().addr.port(),
            8080
        );
    }
}
