//! Wires the sans-IO DHCP server, TFTP and HTTP to sockets and threads.

use crate::boot_files::BootFiles;
use crate::config::{Config, ConfigError, DhcpMode};
use crate::dhcp_server::{ChainChooser, Destination, DhcpServer, Port, Settings};
use crate::dhcp_server::{Handled, LeaseChange, Reply, Seen, MAX_MESSAGE};
use crate::http::{self, HttpLimits};
use crate::lab::{Lab, LabError};
use crate::leases::{Lease, LeaseTable};
use crate::store::{Store, StoreError};
use crate::subnets;
use crate::tftp::{self, ConfinedDir, TftpError, TftpLimits};
use crate::web::{self, WebState};
use diskcast_registry::{Error as RegistryError, Registry};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("interface {interface} has no IPv4 address; give one with `address` in the config")]
    NoAddress { interface: String },
    #[error("reading the addresses of interface {interface}")]
    Interfaces {
        interface: String,
        #[source]
        source: nix::Error,
    },
    #[error("opening the DHCP socket on {interface} port {port} (is another DHCP server running? ports below 1024 need root or CAP_NET_BIND_SERVICE)")]
    DhcpSocket {
        interface: String,
        port: u16,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("creating state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("boot file {what} = {path} does not exist{hint}")]
    MissingBootFile {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("opening the server's registry")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Tftp(#[from] TftpError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("starting the I/O runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Subnets(#[from] crate::subnets::SiteError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The line printed once every service listens; tests wait for it.
pub const READY_LINE: &str = "bootserver ready";

pub fn interface_address(interface: &str) -> Result<Ipv4Addr, ServeError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|source| ServeError::Interfaces {
        interface: interface.into(),
        source,
    })?;
    addrs
        .filter(|a| a.interface_name == interface)
        .find_map(|a| {
            a.address
                .and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
        })
        .ok_or_else(|| ServeError::NoAddress {
            interface: interface.into(),
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn dhcp_socket(interface: &str, ip: Ipv4Addr, port: u16) -> Result<UdpSocket, ServeError> {
    let fail = |source| ServeError::DhcpSocket {
        interface: interface.into(),
        port,
        source,
    };
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(fail)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail)?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true).map_err(fail)?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &OsString::from(interface)).map_err(fail)?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(ip, port)),
    )
    .map_err(fail)?;
    Ok(UdpSocket::from(fd))
}

fn dhcp_loop(
    socket: UdpSocket,
    port: Port,
    interface: String,
    server: Arc<Mutex<DhcpServer>>,
    registry: Registry,
) {
    // One byte more than the largest message accepted: a longer datagram shows up as too long
    // instead of silently cut.
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(from))) => (n, from),
            Ok(_) => continue,
            Err(e) => {
                log::error!("dhcp: receive on {interface} {port:?}: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if log::log_enabled!(log::Level::Trace) {
            let hex: String = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
            log::trace!("dhcp: {n} bytes from {from} on {interface} {port:?}: {hex}");
        }
        let Ok(mut dhcp) = server.lock() else { return };
        let handled = dhcp.handle_on(&buf[..n], from, port, &interface, unix_now());
        drop(dhcp);
        if let Some(summary) = &handled.summary {
            log::info!("{summary}");
        }
        if let Some(seen) = handled.seen {
            record_sighting(&registry, seen);
        }
        let reply = answer_after_saving(handled, |change| save_lease(&registry, change));
        if let Some(reply) = reply {
            let to = match reply.to {
                Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
                Destination::Unicast(addr) => addr,
            };
            if let Err(e) = socket.send_to(&reply.payload, to) {
                log::error!("dhcp: sending reply to {to}: {e}");
            }
        }
    }
}

/// The reply to send once the lease change behind it is saved; none when saving failed, so a
/// client is never promised an address the server would forget (it asks again).
pub fn answer_after_saving(
    handled: Handled,
    save: impl FnOnce(&LeaseChange) -> Result<(), RegistryError>,
) -> Option<Reply> {
    if let Some(change) = &handled.lease_change {
        if let Err(e) = save(change) {
            log::error!(
                "dhcp: not answering: the lease change ({change:?}) could not be saved: {}",
                diskcast_proto::error_chain(&e)
            );
            return None;
        }
    }
    handled.reply
}

/// Every machine that network-boots (and every agent) is in the registry, known or discovered.
fn record_sighting(registry: &Registry, seen: Seen) {
    use crate::classify::{Arch, ClientKind};
    use diskcast_registry::{Firmware, Sighting, Via};
    let firmware = |arch: Arch| match arch {
        Arch::Bios => Firmware::Bios,
        Arch::Uefi64 => Firmware::Uefi,
        Arch::Other(_) => Firmware::Unknown,
    };
    let (firmware, via) = match seen.kind {
        ClientKind::Pxe(arch) => (firmware(arch), Via::Pxe),
        ClientKind::Ipxe(arch) => (firmware(arch), Via::Ipxe),
        ClientKind::Http(arch) => (firmware(arch), Via::Pxe),
        ClientKind::Agent | ClientKind::Other => (Firmware::Unknown, Via::Agent),
    };
    let sighting = Sighting {
        firmware,
        address: seen.address,
        via,
    };
    if let Err(e) = registry.observe(seen.mac, sighting, unix_now()) {
        log::error!(
            "lab: recording {}: {}",
            seen.mac,
            diskcast_proto::error_chain(&e)
        );
    }
}

fn save_lease(registry: &Registry, change: &LeaseChange) -> Result<(), RegistryError> {
    match change {
        LeaseChange::Granted { mac, lease } => registry.put_lease(
            diskcast_registry::Lease {
                mac: *mac,
                address: lease.address,
                expires: lease.expires,
            },
            unix_now(),
        ),
        LeaseChange::Released { mac } => registry.release(*mac).map(drop),
        LeaseChange::Declined { address, until } => registry.decline(*address, *until),
    }
}

/// Leases expired this long ago are forgotten: their holders get the same address back if they
/// return within it.
const LEASE_MEMORY_SECS: u64 = 7 * 24 * 3600;

/// Forgets long-expired leases, in memory and in the registry, once an hour.
fn prune_leases(server: Arc<Mutex<DhcpServer>>, registry: Registry) {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        let now = unix_now();
        if let Ok(mut dhcp) = server.lock() {
            dhcp.leases.prune(now, LEASE_MEMORY_SECS);
        }
        if let Err(e) = registry.prune_expired(now, LEASE_MEMORY_SECS) {
            log::warn!(
                "dhcp: pruning old leases: {}",
                diskcast_proto::error_chain(&e)
            );
        }
    }
}

/// The lease table as the registry holds it; an old `leases.json` is moved in first, once.
fn load_leases(registry: &Registry, state_dir: &std::path::Path) -> Result<LeaseTable, ServeError> {
    let legacy = state_dir.join("leases.json");
    if let Some(count) = registry.import_legacy_leases(&legacy)? {
        log::info!(
            "leases: {count} moved from {} into {}",
            legacy.display(),
            registry.location()
        );
    }
    let mut table = LeaseTable::default();
    for lease in registry.leases()? {
        table.leases.insert(
            lease.mac.to_string(),
            Lease {
                address: lease.address,
                expires: lease.expires,
            },
        );
    }
    Ok(table)
}

fn check_boot_files(config: &Config) -> Result<(), ServeError> {
    let checks: [(&'static str, PathBuf, &'static str); 5] = [
        (
            "boot.kernel",
            config.boot.kernel.clone(),
            " (run scripts/build-lab)",
        ),
        (
            "boot.initramfs",
            config.boot.initramfs.clone(),
            " (run scripts/build-lab)",
        ),
        (
            "undionly.kpxe",
            config.boot.tftp_root.join("undionly.kpxe"),
            " (install Debian's ipxe package)",
        ),
        (
            "ipxe.efi",
            config.boot.tftp_root.join("ipxe.efi"),
            " (install Debian's ipxe package)",
        ),
        (
            "snponly.efi",
            config.boot.tftp_root.join("snponly.efi"),
            " (install Debian's ipxe package)",
        ),
    ];
    for (what, path, hint) in checks {
        if !path.is_file() {
            return Err(ServeError::MissingBootFile { what, path, hint });
        }
    }
    if config.signed_chain_in_use() {
        let signed: [(&'static str, PathBuf, &'static str); 2] = [
            (
                "boot.shim",
                config.boot.shim.clone(),
                " (install Debian's shim-signed package)",
            ),
            (
                "boot.grub_net",
                config.boot.grub_net.clone(),
                " (install Debian's grub-efi-amd64-signed package)",
            ),
        ];
        for (what, path, hint) in signed {
            if !path.is_file() {
                return Err(ServeError::MissingBootFile { what, path, hint });
            }
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every TFTP transfer and HTTP
/// connection costs descriptors, and running out silently breaks everything at once.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => log::info!("open files: limit raised from {soft} to {hard}"),
            Err(e) => log::warn!("open files: limit stays {soft} (raising it to {hard}: {e})"),
        },
        Ok((soft, _)) => log::info!("open files: limit {soft}"),
        Err(e) => log::warn!("open files: reading the limit: {e}"),
    }
}

/// Starts every service and blocks for as long as they run.
pub fn run(config: Config) -> Result<(), ServeError> {
    raise_open_files_limit();
    check_boot_files(&config)?;
    let server_ip = match config.address {
        Some(ip) => ip,
        None => interface_address(&config.interface)?,
    };
    std::fs::create_dir_all(&config.state_dir).map_err(|source| ServeError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let registry = Registry::open_location(&config.database, config.site.as_deref())?;
    let sites = subnets::resolve(&config, &subnets::interface_addresses()?)?;
    let mut leases = load_leases(&registry, &config.state_dir)?;
    // Sites sharing one registry share its lease table; this server hands out (and so only
    // keeps in memory) the addresses of its own subnets.
    leases
        .leases
        .retain(|_, lease| subnets::site_of(&sites, lease.address).is_some());
    log::info!(
        "leases: {} known from {}{}",
        leases.leases.len(),
        registry.location(),
        config
            .site
            .as_deref()
            .map_or(String::new(), |s| format!(" (site {s})"))
    );
    for site in &sites {
        log::info!("dhcp: subnet {}", site.describe());
    }
    let interfaces = subnets::interfaces(&sites, &config.interface);
    let mut addresses = subnets::server_addresses(&sites);
    if !addresses.iter().any(|(_, a)| *a == server_ip) {
        addresses.insert(0, (config.interface.clone(), server_ip));
    }
    let store = Store::open(&config.store_dir)?;
    for stale in store.clean_partials() {
        log::info!(
            "store: removed {} (an upload that never finished)",
            stale.display()
        );
    }
    let admin_token: Arc<str> = crate::lab::admin_token(&config.state_dir)?.into();
    let key = crate::lab::server_key(&config.state_dir)?;
    log::info!(
        "lab: the server's signing key is {} (agents it boots trust it)",
        key.public()
    );
    let https = match &config.https {
        Some(policy) => {
            let names: Vec<String> = addresses.iter().map(|(_, a)| a.to_string()).collect();
            let identity = crate::tls::load_or_create(policy, &config.state_dir, &names)?;
            log::info!(
                "https: port {}, certificate {} with SHA-256 fingerprint {} (agents pin it; boot files stay on plain HTTP)",
                policy.port,
                identity.origin,
                identity.fingerprint
            );
            Some((
                policy.port,
                identity.fingerprint,
                crate::tls::server_config(&identity)?,
            ))
        }
        None => None,
    };
    let mut lab = Lab::new(config, registry.clone(), store, server_ip, key);
    lab.sites = sites.clone();
    lab.https = https
        .as_ref()
        .map(|(port, pin, _)| diskcast_proto::cmdline::HttpsApi {
            port: *port,
            pin: *pin,
        });
    let lab = Arc::new(lab);
    lab.register_configured_machines(unix_now())?;
    let config = &lab.config;
    let chooser_lab = Arc::clone(&lab);
    let settings = Settings {
        mode: config.dhcp.mode,
        sites: sites.clone(),
        lease_secs: config.dhcp.lease_secs,
        uefi_loader: config.boot.uefi_loader,
        http_port: config.http_port,
        uefi_chain: ChainChooser::new(move |mac| chooser_lab.uefi_chain(mac)),
    };
    let dhcp = Arc::new(Mutex::new(DhcpServer::new(settings, leases)));

    let mut threads = Vec::new();
    // Port 67 on every interface (relayed requests arrive unicast, others broadcast); port 4011
    // on each of the server's addresses.
    let dhcp_sockets = interfaces
        .iter()
        .map(|i| (i.clone(), Ipv4Addr::UNSPECIFIED, 67, Port::Dhcp))
        .chain(
            addresses
                .iter()
                .map(|(i, a)| (i.clone(), *a, 4011, Port::PxeBoot)),
        );
    for (interface, bind_ip, port, kind) in dhcp_sockets {
        let socket = dhcp_socket(&interface, bind_ip, port)?;
        let (dhcp, registry) = (Arc::clone(&dhcp), registry.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("dhcp-{port}-{interface}"))
                .spawn(move || dhcp_loop(socket, kind, interface, dhcp, registry)),
        );
    }
    let (pruned, registry_for_pruning) = (Arc::clone(&dhcp), registry.clone());
    threads.push(
        std::thread::Builder::new()
            .name("lease-pruning".into())
            .spawn(move || prune_leases(pruned, registry_for_pruning)),
    );

    if config.boot.answer_router_solicitations {
        // On the links the server shares with its machines; a router answers behind it.
        let mut linked: Vec<&str> = vec![config.interface.as_str()];
        for site in sites.iter().filter(|s| s.attached) {
            if !linked.contains(&site.interface.as_str()) {
                linked.push(&site.interface);
            }
        }
        for interface in linked {
            let advert = nix::net::if_::if_nametoindex(interface)
                .map_err(|e| e.to_string())
                .and_then(|index| {
                    crate::router_advert::open(interface, index)
                        .map(|fd| (fd, index))
                        .map_err(|e| diskcast_proto::error_chain(&e))
                });
            match advert {
                Ok((fd, index)) => threads.push(
                    std::thread::Builder::new().name(format!("router-advert-{interface}")).spawn(move || crate::router_advert::serve(fd, index)),
                ),
                Err(e) => log::warn!("not answering IPv6 router solicitations on {interface} ({e}; its raw ICMPv6 socket needs root or CAP_NET_RAW); iPXE will wait for IPv6 before booting"),
            }
        }
    }

    let tftp_files: Arc<dyn tftp::FileSource> = Arc::new(BootFiles::new(
        Arc::clone(&lab),
        ConfinedDir::new(&config.boot.tftp_root)?,
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bootserver-io")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let tftp_stats = Arc::new(tftp::TftpStats::default());
    // TFTP and HTTP listen on each address machines are given, so every subnet reaches them.
    let mut listeners = Vec::new();
    for (_, address) in &addresses {
        let files = Arc::clone(&tftp_files);
        let tftp_addr = SocketAddr::from((*address, config.tftp_port));
        let tftp_socket = runtime
            .block_on(tokio::net::UdpSocket::bind(tftp_addr))
            .map_err(|source| TftpError::Bind {
                addr: tftp_addr,
                source,
            })?;
        let stats = Arc::clone(&tftp_stats);
        runtime.spawn(async move {
            if let Err(e) = tftp::run(files, tftp_socket, TftpLimits::default(), stats).await {
                log::error!("tftp: {}", diskcast_proto::error_chain(&e));
                std::process::exit(1);
            }
        });
        let http_addr = SocketAddr::from((*address, config.http_port));
        listeners.push(runtime.block_on(http::bind(http_addr))?);
    }
    let mut tls_listeners = Vec::new();
    if let Some((port, _, _)) = &https {
        for (_, address) in &addresses {
            let addr = SocketAddr::from((*address, *port));
            tls_listeners.push(runtime.block_on(http::bind(addr))?);
        }
    }
    let mode = match config.dhcp.mode {
        DhcpMode::Full => "full",
        DhcpMode::Proxy => "proxy",
    };
    let listed: Vec<String> = addresses.iter().map(|(_, a)| a.to_string()).collect();
    log::info!(
        "dhcp {mode} on {}, tftp port {} root {}, http port {}, on {}{}",
        interfaces.join(", "),
        config.tftp_port,
        config.boot.tftp_root.display(),
        config.http_port,
        listed.join(", "),
        if config.signed_chain_in_use() {
            format!(
                "; Secure Boot chain: {} and {}",
                config.boot.shim.display(),
                config.boot.grub_net.display()
            )
        } else {
            String::new()
        }
    );
    let interface = config.interface.clone();
    let manager = Arc::clone(&lab);
    threads.push(
        std::thread::Builder::new()
            .name("lab".into())
            .spawn(move || crate::lab::sessions::manage(manager)),
    );
    let api = crate::api::ApiState {
        lab: Arc::clone(&lab),
        admin_token: Arc::clone(&admin_token),
    };
    let app = web::router(
        Arc::new(WebState::new(lab, dhcp, tftp_stats, admin_token)),
        api,
    );
    log::info!("lab: serving on {interface}; `bootserver token` prints the API's admin token");
    let plain_app = match &https {
        // Credentials and changes only over TLS: plain HTTP keeps boot files and open reads.
        Some((port, _, _)) => app.clone().layer(axum::middleware::from_fn_with_state(
            crate::tls::HttpsPort(*port),
            crate::tls::refuse_in_clear,
        )),
        None => app.clone(),
    };
    for listener in listeners {
        runtime.spawn(http::serve(
            listener,
            plain_app.clone(),
            HttpLimits::default(),
        ));
    }
    if let Some((_, _, tls)) = &https {
        let tls_app = app
            .clone()
            .layer(axum::middleware::from_fn(crate::tls::secure_cookies));
        for listener in tls_listeners {
            runtime.spawn(http::serve_tls(
                listener,
                tls_app.clone(),
                HttpLimits::default(),
                Arc::clone(tls),
            ));
        }
    }
    for thread in &threads {
        if let Err(e) = thread {
            log::error!("starting a service thread: {e}");
            std::process::exit(1);
        }
    }
    println!("{READY_LINE}");
    for thread in threads.into_iter().flatten() {
        let _ = thread.join();
    }
    Ok(())
}
