//! Console output and the logger. Every record goes to the console and, when `/dev/kmsg` is
//! writable, into the kernel log at debug priority so `dmesg` keeps it without the kernel echoing
//! it to the console a second time.
//!
//! "The console" is every console the kernel was given: with `console=tty0 console=ttyS0` the
//! kernel hands PID 1 only the last one as `/dev/console`, but the admin in front of the machine
//! watches the screen and a lab's log server the serial line; both must see the progress.

use diskcast_transport::present::{LiveView, Output};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// One of the kernel's consoles, with the live view (the sender's table, a receiver's line) it
/// shows: redrawn in place on a virtual terminal, printed line by line on a serial console.
#[derive(Debug)]
struct Console {
    file: File,
    view: LiveView,
}

static CONSOLES: OnceLock<Vec<Mutex<Console>>> = OnceLock::new();
/// The live view on stderr, for the host CLI (no kernel consoles taken over).
static HOST_VIEW: Mutex<Option<LiveView>> = Mutex::new(None);

/// Whether the console called `name` (as in `/sys/class/tty/console/active`) is a screen: the
/// kernel's virtual terminals `tty0`, `tty1`... are; serial ports (`ttyS0`, `ttyAMA0`,
/// `ttyUSB0`), hypervisor consoles (`hvc0`) and the like are lines of text that a log server or
/// a serial concentrator records: no cursor movements there.
pub fn is_virtual_terminal(name: &str) -> bool {
    name.strip_prefix("tty")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// How a live view is shown on the console `name` opened as `file`.
fn console_output(name: &str, file: &File) -> Output {
    if is_virtual_terminal(name) {
        Output::Screen {
            rows: crate::sys::terminal_rows(file.as_fd()),
        }
    } else {
        Output::Lines
    }
}

/// From now on, console output goes to every active console (`/sys/class/tty/console/active`).
/// Returns their names. Without that file (a host CLI), output stays on stdout and stderr.
pub fn use_all_consoles(sys: &Path, dev: &Path) -> Vec<String> {
    let names: Vec<String> = std::fs::read_to_string(sys.join("class/tty/console/active"))
        .unwrap_or_default()
        .split_whitespace()
        .filter(|n| !n.contains('/') && !n.starts_with('.'))
        .map(String::from)
        .collect();
    let consoles: Vec<Mutex<Console>> = names
        .iter()
        .filter_map(|n| {
            let file = OpenOptions::new().write(true).open(dev.join(n)).ok()?;
            let view = LiveView::new(console_output(n, &file));
            Some(Mutex::new(Console { file, view }))
        })
        .collect();
    if !consoles.is_empty() {
        let _ = CONSOLES.set(consoles);
    }
    names
}

/// Writes `text` to every console (or to stdout, or stderr for log lines, on a host).
pub fn console_write(text: &str, is_log: bool) {
    match CONSOLES.get() {
        Some(consoles) => {
            for console in consoles {
                if let Ok(mut console) = console.lock() {
                    let _ = console.file.write_all(text.as_bytes());
                    console.view.interrupted();
                }
            }
        }
        None => {
            if let Ok(mut view) = HOST_VIEW.lock() {
                if let Some(view) = view.as_mut() {
                    view.interrupted();
                }
            }
            if is_log {
                let _ = std::io::stderr().write_all(text.as_bytes());
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
        }
    }
}

/// Shows the next update of the live view (`lines`, without line breaks) on every console:
/// redrawn over the previous update on a screen, as new lines on a serial console. On a host
/// it goes to stderr, redrawn when stderr is a terminal.
pub fn console_live(lines: &[String]) {
    match CONSOLES.get() {
        Some(consoles) => {
            for console in consoles {
                if let Ok(mut console) = console.lock() {
                    let text = console.view.update(lines);
                    let _ = console.file.write_all(text.as_bytes());
                }
            }
        }
        None => {
            let Ok(mut view) = HOST_VIEW.lock() else {
                return;
            };
            let view = view.get_or_insert_with(|| {
                let stderr = std::io::stderr();
                LiveView::new(if stderr.is_terminal() {
                    Output::Screen {
                        rows: crate::sys::terminal_rows(stderr.as_fd()),
                    }
                } else {
                    Output::Lines
                })
            });
            let text = view.update(lines);
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

static KMSG: OnceLock<Mutex<File>> = OnceLock::new();

#[derive(Debug)]
struct ConsoleLogger {
    started: Instant,
}

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let line = format!(
            "diskcast[{elapsed:8.3}] {:<5} {}\n",
            record.level(),
            record.args()
        );
        console_write(&line, true);
        if let Some(kmsg) = KMSG.get() {
            if let Ok(mut kmsg) = kmsg.lock() {
                let _ = write_kmsg(&mut *kmsg, &record.args().to_string());
            }
        }
    }

    fn flush(&self) {}
}

/// The kernel log as far as it holds, one `/dev/kmsg` record per line (`PRIO,SEQ,TIME,-;TEXT`);
/// empty when it cannot be read. Non-blocking: it stops at the newest record.
pub fn read_kernel_log() -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut kmsg) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return String::new();
    };
    let mut text = String::new();
    // Each read returns one record; a record overwritten while we read is EPIPE: skip it.
    let mut record = vec![0u8; 8192];
    for _ in 0..100_000 {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&record[..n])),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    text
}

/// Writes `message` into the kernel log: one `write` per line, since every write to /dev/kmsg
/// is one record (formatting straight into the file writes each fragment as its own record).
fn write_kmsg(kmsg: &mut impl Write, message: &str) -> std::io::Result<()> {
    for line in message.lines().filter(|l| !l.trim().is_empty()) {
        kmsg.write_all(format!("<7>diskcast: {line}\n").as_bytes())?;
    }
    Ok(())
}

/// Installs the logger once; later calls change the level and may add the kernel log (PID 1
/// logs before `/dev` is mounted, then again once `/dev/kmsg` exists).
pub fn init(level: log::LevelFilter, to_kmsg: bool) {
    if to_kmsg {
        if let Ok(kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
            let _ = KMSG.set(Mutex::new(kmsg));
        }
    }
    let logger = ConsoleLogger {
        started: Instant::now(),
    };
    let _ = log::set_boxed_logger(Box::new(logger));
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts write calls, as /dev/kmsg counts records.
    #[derive(Default)]
    struct Records(Vec<String>);

    impl Write for Records {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_log_line_is_one_kernel_log_record() {
        let mut kmsg = Records::default();
        let message = format!(
            "modules: {} loaded in {} rounds: {}",
            13, 2, "virtio_net e1000"
        );
        write_kmsg(&mut kmsg, &message).unwrap();
        assert_eq!(
            kmsg.0,
            ["<7>diskcast: modules: 13 loaded in 2 rounds: virtio_net e1000\n"]
        );
        let mut kmsg = Records::default();
        write_kmsg(&mut kmsg, "master:\n  receiver  state\n  aa:bb  done\n").unwrap();
        assert_eq!(kmsg.0.len(), 3, "{:?}", kmsg.0);
        assert!(kmsg
            .0
            .iter()
            .all(|r| r.starts_with("<7>diskcast: ") && r.ends_with('\n')));
    }

    #[test]
    fn active_consoles_are_read_from_sysfs() {
        let root = std::env::temp_dir().join(format!("diskcast-consoles-{}", std::process::id()));
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        std::fs::create_dir_all(sys.join("class/tty/console")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(sys.join("class/tty/console/active"), "tty0 ttyS0\n").unwrap();
        assert_eq!(use_all_consoles(&sys, &dev), ["tty0", "ttyS0"]);
        // No device nodes here: nothing was switched, output stays on stdout/stderr.
        assert!(CONSOLES.get().is_none());
    }

    #[test]
    fn virtual_terminals_are_screens_and_serial_ports_are_lines() {
        for screen in ["tty0", "tty1", "tty12"] {
            assert!(is_virtual_terminal(screen), "{screen}");
        }
        for lines in [
            "ttyS0", "ttyAMA0", "ttyUSB0", "hvc0", "tty", "console", "ttyS", "lp0",
        ] {
            assert!(!is_virtual_terminal(lines), "{lines}");
        }
        // A serial console (here: any file that is no VT) never gets cursor movements.
        let path = std::env::temp_dir().join(format!("diskcast-serial-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        assert_eq!(console_output("ttyS0", &file), Output::Lines);
        // A VT's height comes from the device; a file has none, and then nothing is cut.
        assert_eq!(console_output("tty0", &file), Output::Screen { rows: None });
        std::fs::remove_file(&path).unwrap();
    }
}
