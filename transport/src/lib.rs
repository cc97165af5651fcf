//! diskcast's network edge, shared by the agent (peer master, CLI sender) and the bootserver
//! (deploy from the store): the multicast sockets ([`socket`]), the loop that drives
//! [`diskcast_proto::sender::Sender`] over them ([`send`]), and how a session looks on a console
//! or in a log ([`present`]). The receiver's loop lives in the agent, beside the disk it writes.
#![forbid(unsafe_code)]

pub mod keys;
pub mod present;
pub mod relay;
pub mod send;
pub mod socket;

/// User and system CPU seconds this process used so far (from /proc/self/stat), for the
/// end-of-session log lines that benchmarks read.
pub fn cpu_seconds() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    (ticks(11), ticks(12))
}

/// Random bits from the kernel, for session ids and receiver incarnations; falls back to the
/// clock and the process id where /dev/urandom cannot be read.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_be_bytes(bytes)
}
