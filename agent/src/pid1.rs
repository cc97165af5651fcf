//! The agent as PID 1 of the initramfs: mount the API file systems, load drivers, get an address,
//! print the inventory, act on the role, and finish as the command line says. A failure never
//! returns to the kernel (that would panic it): it ends in [`finish`].

use crate::cmdline::{BootConfig, Finish, Role};
use crate::hardware::{self, DriverCatalogue, Platform};
use crate::inventory::Inventory;
use crate::modules::{self, ModuleIndex, ModulesError};
use crate::netconfig::{self, NetError};
use crate::report::Reporter;
use crate::{logging, sys, READY_MARKER};
use diskcast_proto::report::ReportStep;
use diskcast_proto::units::{human_size, Rate};
use diskcast_transport::present;
use diskcast_transport::send::SendOptions;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the kernel command line from /proc/cmdline")]
    ReadCmdline(#[source] std::io::Error),
    #[error("bad kernel command line")]
    Cmdline(#[from] crate::cmdline::CmdlineError),
    #[error("loading kernel modules for kernel {release}")]
    Modules {
        release: String,
        #[source]
        source: ModulesError,
    },
    #[error("setting up the network")]
    Network(#[from] NetError),
    #[error("role capture needs an image name: the bootserver's config sets it ([agent] image or the machine's image), or add diskcast.image=NAME to the kernel command line")]
    NoImageName,
    #[error("reading the settings on the boot medium")]
    Stick(#[from] crate::stick::StickError),
    #[error("{path}: bad setting")]
    StickSettings {
        path: String,
        #[source]
        source: crate::cmdline::SettingsFileError,
    },
    #[error("the capture failed")]
    Capture(#[from] crate::imaging::capture::CaptureError),
    #[error("choosing the disk")]
    Disk(#[from] crate::inventory::SelectError),
    #[error("sending this disk failed")]
    Send(#[from] crate::imaging::send::SourceError),
    #[error("receiving the image failed")]
    Receive(#[from] crate::imaging::receive::ReceiveError),
    #[error("role relay needs the sender's address: diskcast.upstream=ADDRESS:PORT (the sender's relay port)")]
    NoUpstream,
    #[error("relaying the session failed")]
    Relay(#[from] diskcast_transport::relay::RelayError),
    #[error("role slave needs to know whose sessions to trust: the bootserver puts diskcast.trust=KEY on the command line (`bootserver key show`); diskcast.trust=any accepts any sender on the network")]
    NoTrust,
    #[error("{path}: bad signing key ({})", crate::stick::KEY_FILE)]
    StickKey {
        path: String,
        #[source]
        source: diskcast_proto::trust::KeyError,
    },
}

const MOUNTS: [(&str, &str, &str, libc::c_ulong); 4] = [
    (
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID),
    ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
];

fn mount_api_filesystems() -> Result<(), Pid1Error> {
    for (source, target, fstype, flags) in MOUNTS {
        let _ = std::fs::create_dir_all(target);
        sys::mount(source, target, fstype, flags).map_err(|source| Pid1Error::Mount {
            fstype,
            target,
            source,
        })?;
    }
    Ok(())
}

/// Where the firmware's variables and the kernel's lockdown state can be read: for the inventory
/// only, so a failure (no UEFI, a kernel without securityfs) costs nothing but that line's detail.
const OPTIONAL_MOUNTS: [(&str, &str, &str, libc::c_ulong); 2] = [
    (
        "securityfs",
        "/sys/kernel/security",
        "securityfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        "efivarfs",
        "/sys/firmware/efi/efivars",
        "efivarfs",
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
];

fn mount_optional_filesystems() {
    for (source, target, fstype, flags) in OPTIONAL_MOUNTS {
        if !Path::new(target).is_dir() {
            continue;
        }
        if let Err(e) = sys::mount(source, target, fstype, flags) {
            log::debug!("mounting {fstype} on {target}: {e}");
        }
    }
}

use diskcast_proto::modindex::DRIVER_CATALOGUE;

fn driver_catalogue(index: &ModuleIndex, module_dir: &Path, release: &str) -> DriverCatalogue {
    let all = std::fs::read_to_string(module_dir.join(DRIVER_CATALOGUE))
        .map(|text| ModuleIndex::parse(&text, ""))
        .unwrap_or_default();
    DriverCatalogue {
        packed: index.clone(),
        all,
        kernel: release.to_string(),
    }
}

/// Firmware files drivers asked for and the initramfs lacks, from the kernel log.
fn report_missing_firmware(log: &str) {
    for missing in hardware::missing_firmware(log) {
        log::warn!("{}", missing.advice());
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs PID 1. Never returns.
pub fn run() -> ! {
    let booted = Instant::now();
    // Log to the console before anything else can fail; /dev/kmsg comes with devtmpfs.
    logging::init(log::LevelFilter::Info, false);
    if let Err(e) = mount_api_filesystems() {
        report(&e);
        finish(Finish::Shell);
    }
    logging::init(log::LevelFilter::Info, true);
    logging::use_all_consoles(Path::new("/sys"), Path::new("/dev"));
    mount_optional_filesystems();
    let config = match std::fs::read_to_string("/proc/cmdline")
        .map_err(Pid1Error::ReadCmdline)
        .and_then(|line| BootConfig::parse(&line).map_err(Pid1Error::from))
    {
        Ok(config) => config,
        Err(e) => {
            report(&e);
            finish(BootConfig::default().on_error);
        }
    };
    log::set_max_level(config.log_level);
    let on_error = config.on_error;
    // A panic must end like any other fatal error, never as a kernel panic.
    std::panic::set_hook(Box::new(move |info| {
        if diskcast_proto::dhcp::panic_is_guarded() {
            return;
        }
        log::error!("FATAL: agent bug: {info}");
        finish(on_error);
    }));
    log::info!(
        "diskcast agent {} starting, role {}",
        env!("CARGO_PKG_VERSION"),
        config.role
    );
    let mut config = config;
    let mut reporter = None;
    match boot(&mut config, booted, &mut reporter) {
        Ok(()) => {
            print_console(&format!(
                "diskcast: finished; next: {}\n",
                next_step(config.on_done)
            ));
            finish(config.on_done)
        }
        Err(e) => {
            report(&e);
            if let Some(reporter) = &reporter {
                reporter.send(ReportStep::Failed {
                    reason: crate::error_chain(&e),
                });
            }
            print_console(&format!(
                "diskcast: failed; next: {}\n",
                next_step(config.on_error)
            ));
            finish(config.on_error);
        }
    }
}

fn next_step(how: Finish) -> &'static str {
    match how {
        Finish::Poweroff => "power off",
        Finish::Reboot => "reboot",
        Finish::Shell => "stay at the rescue prompt",
    }
}

/// Settings from `diskcast.cfg` on the boot medium override the kernel command line.
fn apply_stick_settings(
    config: &mut BootConfig,
    index: &ModuleIndex,
    module_dir: &Path,
) -> Result<(), Pid1Error> {
    let (disk, start) = crate::stick::find_boot_medium(
        Path::new("/sys"),
        Path::new("/dev"),
        Duration::from_secs(30),
        || load_new_modules(index, module_dir),
    )?;
    let device = PathBuf::from("/dev").join(&disk.name);
    let text = crate::stick::read_settings(&device, start)?;
    config
        .apply_settings_file(&text)
        .map_err(|source| Pid1Error::StickSettings {
            path: format!("{}:{}", device.display(), crate::stick::SETTINGS_FILE),
            source,
        })?;
    if let Some(text) = crate::stick::read_file(&device, start, crate::stick::KEY_FILE)? {
        let key = diskcast_proto::trust::SigningKey::from_key_file(&text).map_err(|source| {
            Pid1Error::StickKey {
                path: device.display().to_string(),
                source,
            }
        })?;
        print_console(&format!(
            "settings: sessions are signed with the stick's key {}\n",
            key.public()
        ));
        config.sign = Some(key);
    }
    log::set_max_level(config.log_level);
    print_console(&format!(
        "settings: {} from /dev/{} ({}, {}): {}\n",
        crate::stick::SETTINGS_FILE,
        disk.name,
        if disk.model.is_empty() {
            "boot medium"
        } else {
            &disk.model
        },
        crate::inventory::human_size(disk.size_bytes),
        config
            .render_settings_file()
            .lines()
            // Secrets stay off the screen.
            .filter(|l| !["settings =", "sign =", "token ="]
                .iter()
                .any(|p| l.starts_with(p)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

/// Everything PID 1 does between mounting and finishing. `reporter` is set once the network is
/// up and the boot carries a task, so the caller can report a failure too.
fn boot(
    config: &mut BootConfig,
    booted: Instant,
    reporter: &mut Option<Reporter>,
) -> Result<(), Pid1Error> {
    let release = kernel_release();
    let module_dir = PathBuf::from("/lib/modules").join(&release);
    let index = modules::read_index(&module_dir).map_err(|source| Pid1Error::Modules {
        release: release.clone(),
        source,
    })?;
    let report = modules::load_for_present_hardware(
        &index,
        &module_dir,
        Path::new("/sys"),
        Duration::from_millis(150),
        sys::finit_module,
    );
    log::info!(
        "modules: {} loaded in {} rounds{}: {}",
        report.loaded.len(),
        report.rounds,
        if report.failed.is_empty() {
            String::new()
        } else {
            format!(", {} failed", report.failed.len())
        },
        report.loaded.join(" ")
    );

    if config.settings_from_boot_medium {
        apply_stick_settings(config, &index, &module_dir)?;
    }
    let config = &*config;
    let catalogue = driver_catalogue(&index, &module_dir, &release);
    let nic = match netconfig::choose_interface(
        Path::new("/sys"),
        config.interface.as_deref(),
        Duration::from_secs(20),
    ) {
        Err(NetError::NoInterface { controllers }) => {
            report_missing_firmware(&crate::logging::read_kernel_log());
            let network: Vec<_> = hardware::read_controllers(Path::new("/sys"))
                .into_iter()
                .filter(|c| c.kind == hardware::ControllerKind::Network)
                .collect();
            let explained = hardware::unclaimed(&network, &catalogue);
            return Err(NetError::NoInterface {
                controllers: if explained.is_empty() {
                    controllers
                } else {
                    explained.join("; ")
                },
            }
            .into());
        }
        other => other?,
    };
    let configured = netconfig::configure(
        &nic,
        Duration::from_secs(u64::from(config.dhcp_timeout_secs)),
    )?;

    // A disk behind USB storage appears as a SCSI device first; its disk driver (sd_mod) can only
    // be loaded once that device exists.
    let inventory = read_inventory_with_disk(config, || load_new_modules(&index, &module_dir));
    print_console(&inventory.to_string());
    let kernel_log = crate::logging::read_kernel_log();
    let platform = Platform::read(Path::new("/sys"), &kernel_log);
    let controllers = hardware::read_controllers(Path::new("/sys"));
    print_console(&format!("inventory: {platform}\n"));
    for controller in &controllers {
        print_console(&format!("inventory: {controller}\n"));
    }
    let unclaimed = hardware::unclaimed(&controllers, &catalogue);
    for why in &unclaimed {
        log::warn!("{why}");
    }
    report_missing_firmware(&kernel_log);
    print_console(&format!(
        "{READY_MARKER} role={} interface={} mac={} address={} uptime_ms={}\n",
        config.role,
        configured.interface,
        nic.mac,
        configured.lease.address,
        booted.elapsed().as_millis()
    ));

    *reporter = Reporter::new(config, &nic.mac);
    let reporter = reporter.as_ref();
    if let Some(reporter) = reporter {
        let mut report = crate::report::inventory_report(&inventory, unclaimed);
        report.platform = Some(platform.to_string());
        report.controllers = controllers.iter().map(ToString::to_string).collect();
        reporter.send(ReportStep::Booted { inventory: report });
    }
    match config.role {
        Role::Inventory => {}
        Role::Master => master(config, &inventory, &configured.interface, reporter)?,
        Role::Slave => slave(
            config,
            &inventory,
            &configured.interface,
            &nic.mac,
            reporter,
        )?,
        Role::Capture => capture(
            config,
            &inventory,
            config.server.unwrap_or(configured.lease.server),
            &nic.mac,
            reporter,
        )?,
        Role::Relay => relay(config, &configured.interface, &nic.mac)?,
    }
    if let Some(reporter) = reporter {
        reporter.send(ReportStep::Verified);
    }
    Ok(())
}

/// What the console and the server call the disk a task works on.
/// Loads the drivers of devices that appeared since the last round (USB disks, a stick).
fn load_new_modules(index: &ModuleIndex, module_dir: &Path) {
    let report = modules::load_for_present_hardware(
        index,
        module_dir,
        Path::new("/sys"),
        Duration::from_millis(100),
        sys::finit_module,
    );
    if !report.loaded.is_empty() {
        log::info!(
            "modules: {} more loaded: {}",
            report.loaded.len(),
            report.loaded.join(" ")
        );
    }
}

/// How long a role that needs a disk waits for it to appear: USB storage and some controllers
/// add their disks seconds after the driver loaded (a USB disk under TCG: about 5 s).
const DISK_SETTLE: Duration = Duration::from_secs(20);

/// The inventory, read again until the configured disk can be chosen (or [`DISK_SETTLE`] passed)
/// when the role reads or writes a disk, loading the drivers of devices that appeared meanwhile;
/// the inventory role takes what is there.
fn read_inventory_with_disk(config: &BootConfig, mut load_new_modules: impl FnMut()) -> Inventory {
    use crate::inventory::SelectError;
    let deadline = std::time::Instant::now() + DISK_SETTLE;
    let mut told = false;
    loop {
        let inventory = Inventory::read(Path::new("/sys"), Path::new("/dev"));
        let still_missing = matches!(
            crate::inventory::select_disk(&inventory.disks, &config.disk),
            Err(SelectError::NotFound { .. } | SelectError::NoInternalDisk { .. })
        );
        if config.role == Role::Inventory || !still_missing || std::time::Instant::now() >= deadline
        {
            return inventory;
        }
        if !told {
            log::info!(
                "waiting up to {} s for the disk to appear",
                DISK_SETTLE.as_secs()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(250));
        load_new_modules();
    }
}

fn describe(disk: &crate::inventory::Disk) -> String {
    format!(
        "/dev/{} model {:?} serial {:?} {}",
        disk.name,
        disk.model,
        disk.serial,
        human_size(disk.size_bytes)
    )
}

fn disk_chosen(reporter: Option<&Reporter>, disk: &crate::inventory::Disk) {
    if let Some(reporter) = reporter {
        reporter.send(ReportStep::DiskChosen {
            disk: describe(disk),
        });
    }
}

/// The bootserver's API as the boot contract names it: HTTPS with the pinned certificate when
/// the server said so (`diskcast.https_port`, `diskcast.pin`), else plain HTTP on `store_port`.
pub fn api_endpoint(
    config: &BootConfig,
    server: std::net::Ipv4Addr,
) -> crate::http_client::Endpoint {
    use crate::http_client::{Endpoint, ServerTls};
    match config.https {
        Some(https) => Endpoint {
            addr: std::net::SocketAddr::from((server, https.port)),
            tls: ServerTls::Pin(https.pin),
        },
        None => Endpoint::plain(std::net::SocketAddr::from((server, config.store_port))),
    }
}

fn capture(
    config: &BootConfig,
    inventory: &Inventory,
    server: std::net::Ipv4Addr,
    mac: &str,
    reporter: Option<&Reporter>,
) -> Result<(), Pid1Error> {
    use crate::imaging::capture::{run_capture, CaptureOptions};
    let name = config.image.clone().ok_or(Pid1Error::NoImageName)?;
    let disk = crate::inventory::select_disk(&inventory.disks, &config.disk)?;
    disk_chosen(reporter, disk);
    let description = describe(disk);
    print_console(&format!(
        "capture: reading {description}
"
    ));
    let mut opts = CaptureOptions::new(
        PathBuf::from("/dev").join(&disk.name),
        api_endpoint(config, server),
        name,
    );
    opts.source_machine = format!("mac {mac}");
    opts.source_disk = description;
    opts.blocks = config.blocks;
    // The task's one-time token authorises this upload (and nothing else).
    opts.token = config.task.as_ref().map(|t| t.token.clone());
    let started = Instant::now();
    let mut last = Instant::now();
    let mut throttle = crate::report::Throttle::new();
    let summary = run_capture(&opts, |read, uploaded| {
        if let Some(reporter) = reporter.filter(|_| throttle.due()) {
            reporter.send(ReportStep::Progress {
                percent: (100.0 * read as f64 / disk.size_bytes.max(1) as f64).min(100.0),
                mb_per_s: read as f64 / started.elapsed().as_secs_f64().max(1e-3) / 1e6,
                repairs: 0,
            });
        }
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            print_console(&format!(
                "capture: {:.0}% — {} read, {} uploaded, {:.1} MB/s\n",
                100.0 * read as f64 / disk.size_bytes.max(1) as f64,
                human_size(read),
                human_size(uploaded),
                read as f64 / secs / 1e6
            ));
        }
    })?;
    print_console(&format!(
        "DISKCAST-CAPTURE-DONE {} uploaded in {:.1} s; server: {}\n",
        human_size(summary.uploaded),
        summary.elapsed.as_secs_f64(),
        summary.server_says
    ));
    Ok(())
}

fn master(
    config: &BootConfig,
    inventory: &Inventory,
    interface: &str,
    reporter: Option<&Reporter>,
) -> Result<(), Pid1Error> {
    let disk = crate::inventory::select_disk(&inventory.disks, &config.disk)?;
    disk_chosen(reporter, disk);
    print_console(&format!(
        "master: sending /dev/{} — model {:?}, serial {:?}, {}\n",
        disk.name,
        disk.model,
        disk.serial,
        human_size(disk.size_bytes)
    ));
    let mut opts = SendOptions::new(Some(interface.into()), config.group, config.port);
    opts.ttl = config.ttl;
    opts.min_receivers = config.min_receivers;
    opts.start_timeout = config
        .start_timeout_secs
        .map(|s| Duration::from_secs(u64::from(s)));
    if let Some(mbps) = config.rate_mbps {
        opts.max_rate = Rate::from_mbps(f64::from(mbps));
    }
    opts.signing_key = config.sign.clone();
    match &opts.signing_key {
        Some(key) => print_console(&format!(
            "master: signing the session with key {}\n",
            key.public()
        )),
        None => print_console(
            "master: no signing key (diskcast.key on the stick, diskcast.sign): the session is unsigned and only slaves that trust any sender join\n",
        ),
    }
    print_console(&format!(
        "master: waiting for {} slave(s){}; slaves join by network-booting\n",
        opts.min_receivers,
        opts.start_timeout.map_or(String::new(), |t| format!(
            ", or {} s with whoever joined",
            t.as_secs()
        ))
    ));
    let mut last = Instant::now();
    let source = PathBuf::from("/dev").join(&disk.name);
    let summary = crate::imaging::send::run_send(&source, &opts, config.blocks, |progress| {
        if last.elapsed() >= Duration::from_secs(3) {
            last = Instant::now();
            let mut view = vec!["master:".to_string()];
            view.extend(present::progress_table(progress, last));
            crate::logging::console_live(&view);
        }
    })?;
    print_console(&summary.render());
    summary
        .result()
        .map_err(crate::imaging::send::SourceError::from)?;
    print_console("DISKCAST-MASTER-DONE every slave verified its copy\n");
    Ok(())
}

/// Relays a session from another subnet into this one. The spool lives in /tmp, which in the
/// initramfs is memory: a relay machine needs RAM for the image's data.
fn relay(config: &BootConfig, interface: &str, mac: &str) -> Result<(), Pid1Error> {
    use diskcast_transport::relay::{render, run, RelayOptions};
    let trust = config.trust.clone().ok_or(Pid1Error::NoTrust)?;
    let upstream = config.upstream.ok_or(Pid1Error::NoUpstream)?;
    let mut opts = RelayOptions {
        interface: Some(interface.into()),
        group: config.group,
        port: config.port,
        ttl: config.ttl,
        sender: upstream.into(),
        trust,
        id: diskcast_transport::random_u64(),
        name: format!("relay {mac}"),
        min_receivers: config.min_receivers,
        start_timeout: config
            .start_timeout_secs
            .map(|s| Duration::from_secs(u64::from(s))),
        max_rate: Rate::DEFAULT_CEILING,
        receiver_timeout: Duration::from_secs(30),
        sender_timeout: Duration::from_secs(30),
        wait_timeout: None,
        spool_dir: PathBuf::from("/tmp"),
    };
    if let Some(mbps) = config.rate_mbps {
        opts.max_rate = Rate::from_mbps(f64::from(mbps));
    }
    print_console(&format!(
        "relay: subscribing to {upstream}, re-multicasting on {}:{}\n",
        config.group, config.port
    ));
    let mut last = Instant::now();
    let summary = run(&opts, |relay| {
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            let (done, total) = relay.upstream().progress();
            let local = relay.local().map_or(0, |l| l.receivers().count());
            print_console(&format!(
                "relay: upstream {done}/{total} chunks, {local} local receiver(s)\n"
            ));
        }
    })?;
    print_console(&render(&summary));
    summary.result()?;
    Ok(())
}

fn slave(
    config: &BootConfig,
    inventory: &Inventory,
    interface: &str,
    mac: &str,
    reporter: Option<&Reporter>,
) -> Result<(), Pid1Error> {
    use crate::imaging::receive::{run_receive, stable_receiver_id, ReceiveOptions};
    let trust = config.trust.clone().ok_or(Pid1Error::NoTrust)?;
    let disk = crate::inventory::select_disk(&inventory.disks, &config.disk)?;
    disk_chosen(reporter, disk);
    print_console(&format!(
        "slave: writing /dev/{} — model {:?}, serial {:?}, {}\n",
        disk.name,
        disk.model,
        disk.serial,
        human_size(disk.size_bytes)
    ));
    let target = PathBuf::from("/dev").join(&disk.name);
    let opts = ReceiveOptions {
        id: Some(stable_receiver_id(mac, &target)),
        target,
        interface: Some(interface.into()),
        group: config.group,
        port: config.port,
        name: mac.into(),
        serial: disk.serial.clone(),
        grow_last_partition: config.grow_last_partition,
        trust,
        ..ReceiveOptions::default()
    };
    let mut last = Instant::now();
    print_console(&format!(
        "slave: waiting for a session on {}:{}\n",
        config.group, config.port
    ));
    let mut joined = false;
    let mut throttle = crate::report::Throttle::new();
    let mut printed_stage = (false, false);
    run_receive(&opts, |p| {
        if p.chunks_total == 0 {
            return;
        }
        if let Some(reporter) = reporter {
            if !joined {
                joined = true;
                reporter.send(ReportStep::Joined);
            }
            if throttle.due() {
                reporter.send(ReportStep::Progress {
                    percent: p.percent(),
                    mb_per_s: p.mb_per_s(),
                    repairs: p.repairs,
                });
            }
        }
        // Every few seconds, and whenever the copy moves on (verifying, complete): the admin in
        // front of the machine and the serial log both see how far it got.
        let stage = (p.verifying, p.chunks_done == p.chunks_total);
        if last.elapsed() >= Duration::from_secs(SLAVE_PROGRESS_SECS) || stage != printed_stage {
            last = Instant::now();
            printed_stage = stage;
            print_console(&format!("slave: {}\n", p.line()));
        }
    })?;
    print_console(&format!(
        "DISKCAST-SLAVE-DONE /dev/{} verified\n",
        disk.name
    ));
    Ok(())
}

/// How often a slave prints its progress line on its consoles.
const SLAVE_PROGRESS_SECS: u64 = 5;

fn print_console(text: &str) {
    crate::logging::console_write(text, false);
}

/// Prints an error with its chain of causes.
pub fn report(error: &dyn std::error::Error) {
    log::error!("FATAL: {}", crate::error_chain(error));
}

/// Ends PID 1 as told. Never returns: a returning init panics the kernel.
pub fn finish(how: Finish) -> ! {
    match how {
        Finish::Reboot | Finish::Poweroff => {
            let action = if how == Finish::Reboot {
                sys::PowerAction::Reboot
            } else {
                sys::PowerAction::PowerOff
            };
            log::info!(
                "{}",
                if how == Finish::Reboot {
                    "rebooting"
                } else {
                    "powering off"
                }
            );
            quiesce_network();
            let error = sys::power(action);
            log::error!("{how} failed: {error}; dropping to the rescue prompt");
            rescue_shell()
        }
        Finish::Shell => rescue_shell(),
    }
}

/// Takes every network interface down before the machine powers off or reboots: under QEMU a
/// virtio NIC reset by the shutdown while its driver still polled transmit completions locked
/// the guest up (seen once, the copy already verified); a stopped driver has nothing to poll.
fn quiesce_network() {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "lo" {
            if let Err(e) = sys::interface_down(&name) {
                log::debug!("taking {name} down: {e}");
            }
        }
    }
}

fn rescue_shell() -> ! {
    let stdin = std::io::stdin();
    loop {
        print_console("diskcast rescue> commands: inventory, reboot, poweroff\ndiskcast rescue> ");
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => std::thread::sleep(Duration::from_secs(3600)),
            Ok(_) => match line.trim() {
                "inventory" => print_console(
                    &Inventory::read(Path::new("/sys"), Path::new("/dev")).to_string(),
                ),
                "reboot" => finish(Finish::Reboot),
                "poweroff" => finish(Finish::Poweroff),
                "" => {}
                other => print_console(&format!("unknown command {other:?}\n")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_client::ServerTls;

    #[test]
    fn the_boot_contract_chooses_https_with_its_pin_or_plain_http() {
        let server = std::net::Ipv4Addr::new(10, 77, 0, 1);
        let pin = "7a".repeat(32);
        let https = BootConfig::parse(&format!(
            "diskcast.server=10.77.0.1 diskcast.https_port=8443 diskcast.pin={pin}"
        ))
        .unwrap();
        let endpoint = api_endpoint(&https, server);
        assert_eq!(endpoint.to_string(), "https://10.77.0.1:8443");
        assert!(matches!(endpoint.tls, ServerTls::Pin(p) if p.to_string() == pin));
        let plain =
            BootConfig::parse("diskcast.server=10.77.0.1 diskcast.store_port=8181").unwrap();
        let endpoint = api_endpoint(&plain, server);
        assert_eq!(endpoint.to_string(), "http://10.77.0.1:8181");
        assert!(matches!(endpoint.tls, ServerTls::Plain));
    }
}
