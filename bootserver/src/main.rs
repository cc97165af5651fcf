//! `bootserver`: DHCP, TFTP and HTTP for network-booting the diskcast agent.

use clap::{Parser, Subcommand, ValueEnum};
use diskcast_bootserver::admin;
use diskcast_bootserver::config::{Config, DhcpMode, HttpsIdentity};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use diskcast_bootserver::deploy::deploy_once;
use diskcast_bootserver::pull::{pull, Progress, PullOptions};
use diskcast_bootserver::store::{Signature, Store, StoreError};
use diskcast_bootserver::web::short_hash;
use diskcast_proto::cmdline::Blocks;
use diskcast_proto::units::human_size;
use diskcast_proto::units::Rate;
use diskcast_transport::send::SendOptions;

fn age(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(created);
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

fn images(store: &Store, command: ImagesCommand) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        ImagesCommand::List => {
            println!(
                "{:<24} {:>10} {:>10} {:>10} {:>10} {:>6}  {:<16} {:<16} origin",
                "name", "disk", "used", "data", "stored", "ratio", "created", "hash"
            );
            for entry in store.list()? {
                match entry {
                    Ok(i) => println!(
                        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>5.2}x  {:<16} {:<16} {}",
                        i.name,
                        human_size(i.raw_size),
                        human_size(i.used_bytes),
                        human_size(i.data_bytes),
                        human_size(i.file_len),
                        i.data_bytes as f64 / i.stored_bytes.max(1) as f64,
                        age(i.created),
                        short_hash(&i.image_hash),
                        i.origin
                    ),
                    Err(e) => println!("(unreadable) {}", diskcast_proto::error_chain(&e)),
                }
            }
            for name in diskcast_bootserver::pull::staged_pulls(store) {
                eprintln!(
                    "(a pull of {name} is staged, not finished: run the same `images pull` again to continue, or delete {} to abandon it)",
                    store.dir().join(format!(".{name}.pull")).display()
                );
            }
            Ok(())
        }
        ImagesCommand::Show { name } => {
            let (summary, image) = store.show(&name)?;
            let m = &image.manifest;
            let zstd = m
                .chunks
                .iter()
                .filter(|c| matches!(c, diskcast_proto::manifest::ChunkKind::Zstd { .. }))
                .count();
            let zero = m
                .chunks
                .iter()
                .filter(|c| **c == diskcast_proto::manifest::ChunkKind::Zero)
                .count();
            println!("image:          {name}");
            println!(
                "file:           {} ({} bytes)",
                image.path().display(),
                image.file_len
            );
            println!(
                "disk size:      {} ({} bytes)",
                human_size(m.image_size),
                m.image_size
            );
            let absent = m
                .chunks
                .iter()
                .filter(|c| **c == diskcast_proto::manifest::ChunkKind::Absent)
                .count();
            println!(
                "chunks:         {} of {}: {} data ({} zstd, {} raw), {zero} zero, {absent} unused",
                m.chunk_count(),
                human_size(u64::from(m.chunk_size)),
                m.data_chunks().count(),
                zstd,
                m.data_chunks().count() - zstd
            );
            println!(
                "used:           {} ({} unused: not stored, sent or written)",
                human_size(m.image_size - m.absent_bytes()),
                human_size(m.absent_bytes())
            );
            println!(
                "data:           {} stored in {} ({:.2}x)",
                human_size(summary.data_bytes),
                human_size(summary.stored_bytes),
                summary.data_bytes as f64 / summary.stored_bytes.max(1) as f64
            );
            println!(
                "image hash:     {}",
                summary
                    .image_hash
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            println!(
                "created:        {} ({})",
                summary.created,
                age(summary.created)
            );
            println!("origin:         {}", image.metadata.origin);
            println!("source machine: {}", image.metadata.source_machine);
            println!("source disk:    {}", image.metadata.source_disk);
            println!("compression:    {}", image.metadata.compression);
            println!("written by:     {}", image.metadata.writer);
            println!("signature:      {}", store.signature(&image));
            Ok(())
        }
        ImagesCommand::Verify { name } => {
            let started = std::time::Instant::now();
            let (summary, signature) = store.verify(&name)?;
            println!(
                "{name}: every chunk decompressed and matched its hash ({} in {:.1} s); {signature}",
                human_size(summary.data_bytes),
                started.elapsed().as_secs_f64()
            );
            match signature {
                Signature::By(_) => Ok(()),
                Signature::Untrusted(why) => Err(StoreError::Untrusted { name, why }.into()),
                Signature::NotChecked => Err(StoreError::NoKeys { name }.into()),
            }
        }
        ImagesCommand::Sign { name } => {
            let summary = store.sign(&name)?;
            println!(
                "{name}: every chunk checked, signed ({}); {}",
                summary.sizes(),
                store.signature(&store.open_image(&name)?)
            );
            Ok(())
        }
        ImagesCommand::Delete { name } => {
            store.delete(&name)?;
            println!("deleted {name}");
            Ok(())
        }
        ImagesCommand::Import {
            raw,
            name,
            level,
            all_blocks,
            trust_unclean_fs,
        } => {
            let summary = if raw.as_os_str() == "-" {
                if !all_blocks {
                    log::info!("stdin is read whole: a stream's used blocks cannot be mapped");
                }
                store.import(&name, &mut std::io::stdin().lock(), "stdin", level)?
            } else {
                let file = std::fs::File::open(&raw)
                    .map_err(|e| format!("opening {}: {e}", raw.display()))?;
                let blocks = match (all_blocks, trust_unclean_fs) {
                    (true, _) => Blocks::All,
                    (false, true) => Blocks::UsedTrustUnclean,
                    (false, false) => Blocks::Used,
                };
                let used = diskcast_fsmap::chunks_to_read(
                    &file,
                    &raw,
                    diskcast_proto::manifest::DEFAULT_CHUNK_SIZE,
                    blocks,
                );
                let desc = raw.display().to_string();
                store.import_disk(&name, &file, &desc, level, used.as_deref())?
            };
            println!("imported {name}: {}", summary.sizes());
            Ok(())
        }
        ImagesCommand::Pull {
            url,
            name,
            trust_source,
            trust_any,
            token,
        } => {
            let mut trust = Vec::new();
            for text in &trust_source {
                trust.extend(
                    diskcast_proto::trust::parse_key_list(text)
                        .map_err(|e| format!("--trust {text:?}: {e}"))?,
                );
            }
            let opts = PullOptions {
                url,
                name,
                trust,
                trust_any,
                token,
            };
            let mut shown = 0;
            let report = pull(store, &opts, |progress| match progress {
                Progress::Start { total, staged } if staged > 0 => eprintln!(
                    "resuming: {staged} of {total} chunks already staged and verified, fetching {}",
                    total - staged
                ),
                Progress::Start { total, .. } => eprintln!("fetching {total} chunks"),
                // About every tenth, so a long pull shows it is alive.
                Progress::Chunk { done, total } if done * 10 / total.max(1) != shown => {
                    shown = done * 10 / total.max(1);
                    eprintln!("{done} of {total} chunks staged");
                }
                Progress::Chunk { .. } => {}
            })?;
            println!(
                "pulled {}: {} chunks fetched ({}), {} already staged, of {}; {}; {}",
                report.name,
                report.fetched,
                human_size(report.fetched_bytes),
                report.already_staged,
                report.data_chunks,
                report.summary.sizes(),
                match (report.source_key, report.resigned) {
                    (Some(key), true) => format!("source signature by {key} checked; re-signed with this store's key"),
                    (Some(key), false) => format!("source signature by {key} checked; kept (this store has no key)"),
                    (None, _) => format!(
                        "NOT vouched for (--trust-any): kept as it came; `images sign {}` once checked",
                        report.name
                    ),
                }
            );
            Ok(())
        }
        ImagesCommand::Export { name, raw, force } => {
            if raw.as_os_str() == "-" {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                store.export_to(&name, &mut out)?;
            } else {
                store.export(&name, &raw, force)?;
                eprintln!("exported {name} to {}", raw.display());
            }
            Ok(())
        }
    }
}

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
    /// Print the iPXE script a machine would get now (changes nothing).
    Script {
        #[command(flatten)]
        config: ConfigArgs,
        /// The machine's MAC address.
        #[arg(long)]
        mac: String,
    },
    /// The lab's machines: known (registered) and discovered.
    Machines {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: admin::MachinesCommand,
    },
    /// Create, show or cancel a one-shot task.
    Task {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: admin::TaskCommand,
    },
    /// Open tasks (--all: the history too).
    Tasks {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        all: bool,
    },
    /// Print the API's admin token (made on first use, in the state directory).
    Token {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// The server's signing key: `show` prints its public key (what agents trust), `new FILE`
    /// makes a key file for a sender of your own.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Send Wake-on-LAN packets to machines (MAC, NAME or @GROUP).
    Wake {
        #[command(flatten)]
        config: ConfigArgs,
        target: String,
    },
    /// Manage the image store.
    Images {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Multicast a stored image to slaves (one session), as a peer master would.
    Deploy(DeployArgs),
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Print the server's public key (made on first use in the state directory).
    Show {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Make a new key file (0600) and print its public key: for `--key` of `images` and
    /// `deploy` by hand, or a peer master of your own.
    New { file: PathBuf },
    /// Print the SHA-256 fingerprint of the HTTPS certificate (`[https]`): what agents pin, for
    /// `agent capture --pin` by hand. A self-signed one is made now if it was not yet.
    Https {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The image store directory.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    store: Option<PathBuf>,
    /// Or the server's config file (its `store_dir`, or STATE_DIR/images; its signing key).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// With --store: the key file that signs imports and sessions (`bootserver key new`).
    #[arg(long, requires = "store")]
    key: Option<PathBuf>,
    /// Also trust images signed by this public key (repeat for several).
    #[arg(long, value_name = "KEY")]
    trust: Vec<String>,
}

impl StoreArgs {
    /// The store, with the key that signs and the keys it trusts; only `create` makes a
    /// missing directory (a typo must not look like an empty store).
    fn open(&self, create: bool) -> Result<Store, Box<dyn std::error::Error>> {
        let (dir, key, mut trusted) = match (&self.store, &self.config) {
            (Some(dir), _) => {
                let key = match &self.key {
                    Some(path) => Some(diskcast_transport::keys::read_key(path)?),
                    None => None,
                };
                (dir.clone(), key, Vec::new())
            }
            (None, Some(config)) => {
                let config = Config::load(config)?;
                let key = diskcast_bootserver::lab::server_key(&config.state_dir)?;
                (config.store_dir, Some(key), config.security.trusted_keys)
            }
            (None, None) => return Err("give --store DIR or --config FILE".into()),
        };
        for text in &self.trust {
            trusted.extend(
                diskcast_proto::trust::parse_key_list(text)
                    .map_err(|e| format!("--trust {text:?}: {e}"))?,
            );
        }
        if !create && !dir.is_dir() {
            return Err(format!(
                "there is no image store at {} (check --store or the config's store_dir)",
                dir.display()
            )
            .into());
        }
        let mut store = Store::open(&dir)?.trusting(&trusted);
        if let Some(key) = key {
            store = store.with_signer(key);
        }
        Ok(store)
    }
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// One line per image: name, sizes, compression, age, hash.
    List,
    /// Everything known about one image.
    Show { name: String },
    /// Decompress and hash every chunk of an image and check its signature (fails unless it is
    /// signed by a trusted key).
    Verify { name: String },
    /// Check every chunk of an image, then sign it with the store's key (an image imported
    /// unsigned, or signed by a key no longer trusted).
    Sign { name: String },
    /// Remove an image.
    Delete { name: String },
    /// Store a raw disk image (a file, a device, or `-` for stdin).
    /// Of a file or device, only the blocks its file systems use are read (see --all-blocks).
    Import {
        raw: PathBuf,
        name: String,
        /// zstd level (1 fastest ... 19 smallest).
        #[arg(long, default_value_t = diskcast_proto::codec::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Read every block, not only those the file systems use.
        #[arg(long, conflicts_with = "trust_unclean_fs")]
        all_blocks: bool,
        /// Map file systems that were not cleanly unmounted instead of reading them whole.
        #[arg(long)]
        trust_unclean_fs: bool,
    },
    /// Copy an image from another bootserver (URL: http://HOST:PORT/images/NAME). Its signature
    /// is checked before any chunk is fetched, each chunk against its hash as it arrives; a pull
    /// that stops continues where it stopped when run again; the image is listed only once
    /// complete and verified, then signed with this store's key.
    Pull {
        url: String,
        /// The name in this store (default: the source's).
        #[arg(long)]
        name: Option<String>,
        /// The key the source's signature must verify under (`bootserver key show` there;
        /// repeat for several). Default: the keys this store trusts.
        #[arg(long = "trust", value_name = "KEY", conflicts_with = "trust_any")]
        trust_source: Vec<String>,
        /// Take the image unsigned or signed by any key; it is kept as it came (not re-signed):
        /// `images sign` it once you checked it.
        #[arg(long)]
        trust_any: bool,
        /// The source's admin token (`bootserver token` there), when it closes reads.
        #[arg(long)]
        token: Option<String>,
    },
    /// Write an image as a raw disk image (a file, a device, or `-` for stdout).
    Export {
        name: String,
        raw: PathBuf,
        /// Replace an existing regular file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
struct DeployArgs {
    /// The stored image.
    image: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Interface facing the slaves.
    #[arg(long, short)]
    interface: String,
    /// Multicast group and port (what the slaves were told).
    #[arg(long, default_value_t = diskcast_proto::wire::DEFAULT_GROUP)]
    group: Ipv4Addr,
    #[arg(long, default_value_t = diskcast_proto::wire::DEFAULT_PORT)]
    port: u16,
    /// Start once this many slaves joined...
    #[arg(long, default_value_t = 1)]
    min_receivers: u32,
    /// ...or this many seconds after starting, with whoever joined.
    #[arg(long)]
    start_timeout: Option<u64>,
    /// Drop slaves not done this many seconds after the data started (default: wait for all).
    #[arg(long)]
    deadline: Option<u64>,
    /// MB/s at most.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// MB/s: the lowest rate the session slows down to for a slave that loses most datagrams;
    /// one that still does there is dropped.
    #[arg(long, default_value_t = 10.0)]
    min_rate: f64,
    /// Multicast TTL: the routers between the server and the slaves, plus one (1: this LAN only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    ttl: u8,
    /// Data bytes per datagram (even, 512 to 65480), or `mtu`: as much as this interface's MTU
    /// takes without IP fragments (8896 at a jumbo MTU of 9000), for a LAN where every slave
    /// has that MTU too. The default, 1408, fits a 1500-byte MTU.
    #[arg(long, value_parser = diskcast_transport::send::parse_block_size)]
    block_size: Option<diskcast_transport::send::BlockSize>,
}

fn load(args: &ConfigArgs) -> Result<Config, diskcast_bootserver::config::ConfigError> {
    let mut config = Config::load(&args.config)?;
    let mode = args.mode.map(|mode| match mode {
        ModeArg::Full => DhcpMode::Full,
        ModeArg::Proxy => DhcpMode::Proxy,
    });
    config.override_with(args.interface.clone(), mode, args.state_dir.clone())?;
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
        if !diskcast_proto::dhcp::panic_is_guarded() {
            default_hook(info);
        }
    }));
    let result: Result<(), Box<dyn std::error::Error>> = (|| match cli.command {
        Command::Serve(args) => Ok(diskcast_bootserver::serve::run(load(&args)?)?),
        Command::CheckConfig(args) => {
            let config = load(&args)?;
            // A shared registry is part of the config: unreachable, refusing the login, or
            // written by a newer diskcast is a config error now, not at the next start.
            let registry = match diskcast_registry::Registry::probe(&config.database)? {
                None => String::new(),
                Some(found) => format!(
                    ", registry {} at schema version {found} of {}",
                    config.database,
                    diskcast_registry::SCHEMA_VERSION
                ),
            };
            // The certificate and key are read now, not at the first connection.
            let https = match &config.https {
                None => "HTTPS off".to_string(),
                Some(policy) => {
                    let identity = match &policy.identity {
                        HttpsIdentity::Files { cert, key } => {
                            Some(diskcast_bootserver::tls::load_files(cert, key)?)
                        }
                        HttpsIdentity::Generated => {
                            diskcast_bootserver::tls::load_generated(&config.state_dir)?
                        }
                    };
                    match identity {
                        Some(identity) => format!(
                            "HTTPS on port {} with {} (SHA-256 {})",
                            policy.port, identity.origin, identity.fingerprint
                        ),
                        None => format!(
                            "HTTPS on port {} with a self-signed certificate made at first start",
                            policy.port
                        ),
                    }
                }
            };
            println!(
                "{}: ok ({:?} mode on {}{registry}; {https})",
                args.config.display(),
                config.dhcp.mode,
                config.interface
            );
            Ok(())
        }
        Command::Script { config, mac } => admin::script(load(&config)?, &mac),
        Command::Machines { config, command } => admin::machines(load(&config)?, command),
        Command::Task { config, command } => admin::task(load(&config)?, command),
        Command::Tasks { config, all } => admin::tasks(load(&config)?, all),
        Command::Token { config } => admin::token(&load(&config)?),
        Command::Key { command } => match command {
            KeyCommand::Show { config } => {
                let config = load(&config)?;
                let key = diskcast_bootserver::lab::server_key(&config.state_dir)?;
                println!("{}", key.public());
                Ok(())
            }
            KeyCommand::Https { config } => {
                let config = load(&config)?;
                let policy = config.https.as_ref().ok_or(
                    "HTTPS is off: add an [https] section to the config (README, \"HTTPS\")",
                )?;
                let names: Vec<String> = config
                    .address
                    .map(Ok)
                    .unwrap_or_else(|| {
                        diskcast_bootserver::serve::interface_address(&config.interface)
                    })
                    .map(|a| vec![a.to_string()])
                    .unwrap_or_default();
                let identity =
                    diskcast_bootserver::tls::load_or_create(policy, &config.state_dir, &names)?;
                eprintln!("certificate: {}", identity.origin);
                println!("{}", identity.fingerprint);
                Ok(())
            }
            KeyCommand::New { file } => {
                let key = diskcast_transport::keys::new_key()?;
                diskcast_transport::keys::write_key(&file, &key)?;
                eprintln!("made {} (secret: keep it private)", file.display());
                println!("{}", key.public());
                Ok(())
            }
        },
        Command::Wake { config, target } => admin::wake(load(&config)?, &target),
        Command::Images { store, command } => {
            let create = matches!(
                command,
                ImagesCommand::Import { .. } | ImagesCommand::Pull { .. }
            );
            images(&store.open(create)?, command)
        }
        Command::Deploy(args) => {
            let store = args.store.open(false)?;
            let mut opts = SendOptions::new(Some(args.interface), args.group, args.port);
            opts.signing_key = Some(store.signer().cloned().ok_or(
                "deploy signs its session: give --config (the server's key) or --key FILE",
            )?);
            opts.min_receivers = args.min_receivers;
            opts.start_timeout = args.start_timeout.map(Duration::from_secs);
            opts.deadline = args.deadline.map(Duration::from_secs);
            opts.max_rate = Rate::from_mbps(args.rate);
            opts.min_rate = Rate::from_mbps(args.min_rate);
            opts.ttl = args.ttl;
            opts.block_size = args.block_size.unwrap_or_default();
            let summary = deploy_once(&store, &args.image, &opts, |progress| {
                eprintln!(
                    "deploying {}:\n{}",
                    args.image,
                    diskcast_transport::present::progress_table(
                        progress,
                        std::time::Instant::now()
                    )
                    .join("\n")
                );
            })?;
            print!("{}", summary.render());
            Ok(summary.result()?)
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", diskcast_proto::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
