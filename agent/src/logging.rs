//! Console logger: every record goes to stderr (the console when the agent is PID 1) and, when
//! `/dev/kmsg` is writable, into the kernel log at debug priority so `dmesg` keeps it without the
//! kernel echoing it to the console a second time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
struct ConsoleLogger {
    started: Instant,
    kmsg: Option<Mutex<File>>,
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
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some(kmsg) = &self.kmsg {
            if let Ok(mut kmsg) = kmsg.lock() {
                let _ = write!(kmsg, "<7>diskcast: {}", record.args());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: log::LevelFilter, to_kmsg: bool) {
    let kmsg = to_kmsg
        .then(|| OpenOptions::new().write(true).open("/dev/kmsg").ok())
        .flatten()
        .map(Mutex::new);
    let logger = ConsoleLogger {
        started: Instant::now(),
        kmsg,
    };
    let _ = log::set_boxed_logger(Box::new(logger));
    log::set_max_level(level);
}
