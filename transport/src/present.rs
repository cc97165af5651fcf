//! How a session looks to people: the sender's live table and summary, a receiver's progress
//! line. Plain text, the same on a console, a serial log and the server log.

use crate::send::SendSummary;
use diskcast_proto::sender::{ReceiverFailure, Sender};
use diskcast_proto::units::human_size;
use diskcast_proto::wire::ReceiverState;
use std::time::{Duration, Instant};

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

fn state_name(state: ReceiverState) -> &'static str {
    match state {
        ReceiverState::Joining => "joining",
        ReceiverState::Receiving => "receiving",
        ReceiverState::Verifying => "verifying",
        ReceiverState::Done => "done",
        ReceiverState::Failed => "FAILED",
    }
}

/// A receiver's name for tables: what it calls itself, or its id; control characters from the
/// network never reach the terminal.
fn display_name(name: &str, id: u64) -> String {
    if name.is_empty() {
        format!("{id:016x}")
    } else {
        printable(name)
    }
}

/// `text` with control characters replaced, so names and serials from the network cannot move
/// the cursor or clear a screen.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The live table of a send at `now`: one line per receiver (name, address, state, percentage,
/// rate, repairs), then the total rate and the time left.
pub fn progress_table(sender: &Sender, now: Instant) -> Vec<String> {
    let chunk = u64::from(sender.manifest().chunk_size);
    let mut lines = vec![format!(
        "  {:<20} {:<15} {:<10} {:>6}  {:>7}  {:>7}",
        "receiver", "address", "state", "done", "MB/s", "repairs"
    )];
    let mut seconds_left: f64 = 0.0;
    let mut active = 0;
    // Receivers count zero chunks as done once zeroed: progress and rates are about data.
    let manifest = sender.manifest();
    let data_chunks = manifest.data_chunks().count() as u32;
    let other_chunks = manifest.chunk_count() - data_chunks;
    for r in sender.receivers() {
        let data_done = r.chunks_done.saturating_sub(other_chunks).min(data_chunks);
        let pct = if r.state == ReceiverState::Done || data_chunks == 0 {
            100.0 * f64::from(u8::from(r.state == ReceiverState::Done))
        } else {
            100.0 * f64::from(data_done) / f64::from(data_chunks)
        };
        let elapsed = r
            .finished_at
            .unwrap_or(now)
            .saturating_duration_since(r.joined_at);
        let rate = mb_per_s(u64::from(data_done) * chunk, elapsed);
        if !r.is_final() {
            active += 1;
            let left = u64::from(data_chunks - data_done) * chunk;
            if rate > 0.0 {
                seconds_left = seconds_left.max(left as f64 / 1e6 / rate);
            }
        }
        lines.push(format!(
            "  {:<20} {:<15} {:<10} {:5.1}%  {:7.1}  {:>7}{}",
            display_name(&r.name, r.id),
            r.address.map_or("-".to_string(), |a| a.ip().to_string()),
            state_name(r.state),
            pct,
            rate,
            r.repairs_requested,
            r.failure.as_ref().map_or(String::new(), |f| format!(
                "  ({})",
                printable(&f.to_string())
            ))
        ));
    }
    let total = match sender.data_started() {
        Some(started) => format!(
            "  total: {} receiver(s), {:.1} MB/s on the wire (limit {:.0}), {}",
            sender.receivers().count(),
            mb_per_s(
                sender.stats.data_bytes,
                now.saturating_duration_since(started)
            ),
            sender.rate() as f64 / 1e6,
            if active == 0 {
                "all finished".to_string()
            } else if seconds_left > 0.0 {
                format!("about {seconds_left:.0} s left")
            } else {
                "time left unknown yet".to_string()
            }
        ),
        None => format!(
            "  waiting for receivers: {} joined, the start policy wants {}",
            sender.receivers().count(),
            sender.min_receivers()
        ),
    };
    lines.push(total);
    lines
}

impl SendSummary {
    /// The summary table printed when a send ends.
    pub fn render(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mut out = format!(
            "session summary: image {} ({} of data), waited {:.1} s for receivers, then {:.1} s: {:.1} MB/s of data, sent {:.2}x the data\n",
            human_size(self.image_size),
            human_size(self.data_bytes),
            self.waited.as_secs_f64(),
            secs,
            mb_per_s(self.data_bytes, self.elapsed),
            self.sent_bytes as f64 / self.data_bytes.max(1) as f64
        );
        out.push_str(&format!(
            "  {:<20} {:<18} {:<10} {:>8} {:>9}  result\n",
            "receiver", "serial", "state", "seconds", "repairs"
        ));
        for r in &self.receivers {
            let secs = r.finished_at.map_or(String::from("-"), |f| {
                format!("{:.1}", f.duration_since(r.joined_at).as_secs_f64())
            });
            out.push_str(&format!(
                "  {:<20} {:<18} {:<10} {:>8} {:>9}  {}\n",
                display_name(&r.name, r.id),
                printable(&r.serial),
                state_name(r.state),
                secs,
                r.repairs_requested,
                match (&r.state, &r.failure) {
                    (ReceiverState::Done, _) => "verified".to_string(),
                    (_, Some(why)) => printable(&why.to_string()),
                    _ => "unknown".to_string(),
                }
            ));
        }
        let refused = self
            .receivers
            .iter()
            .filter(|r| matches!(r.failure, Some(ReceiverFailure::Refused(_))))
            .count();
        if refused > 0 {
            out.push_str(&format!(
                "  {refused} receiver(s) refused this session before writing anything: they do not trust its signature\n"
            ));
        }
        out
    }
}

/// Progress of a receive, for the caller's display.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveProgress {
    pub chunks_done: u32,
    pub chunks_total: u32,
    pub image_size: u64,
    pub elapsed: Duration,
    pub verifying: bool,
}

impl ReceiveProgress {
    pub fn percent(&self) -> f64 {
        if self.chunks_total == 0 {
            0.0
        } else {
            100.0 * f64::from(self.chunks_done) / f64::from(self.chunks_total)
        }
    }

    /// `42.0% (420/1000 chunks), verifying after 12 s`
    pub fn line(&self) -> String {
        format!(
            "{:5.1}% ({}/{} chunks){} after {:.0} s",
            self.percent(),
            self.chunks_done,
            self.chunks_total,
            if self.verifying { ", verifying" } else { "" },
            self.elapsed.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskcast_proto::manifest::Manifest;
    use diskcast_proto::sender::SenderConfig;
    use diskcast_proto::wire::{Body, Packet};

    #[test]
    fn names_and_serials_from_the_network_cannot_drive_the_terminal() {
        let image = vec![7u8; 1 << 20];
        let manifest = Manifest::scan(
            &mut std::io::Cursor::new(&image),
            image.len() as u64,
            1 << 20,
            |_| {},
        )
        .unwrap();
        let now = Instant::now();
        let mut sender = Sender::new(SenderConfig::default(), manifest, now);
        let join = Packet {
            session: 1,
            body: Body::Join {
                receiver: 9,
                incarnation: 1,
                disk_size: 1 << 30,
                logical_block: 512,
                refusal: 0,
                name: "\u{1b}[2J\u{1b}[Hall good\r".into(),
                serial: "SN\u{7}\u{1b}]0;pwned\u{7}".into(),
            },
        }
        .emit();
        sender.handle_datagram(&join, "10.0.0.2:7744".parse().unwrap(), now);
        let table = progress_table(&sender, now).join("\n");
        assert!(table.contains("?[2J?[Hall good?"), "{table}");
        let summary = SendSummary {
            waited: Duration::ZERO,
            image_size: 1 << 20,
            data_bytes: 1 << 20,
            sent_bytes: 0,
            elapsed: Duration::from_secs(1),
            receivers: sender.receivers().cloned().collect(),
            outcome: diskcast_proto::sender::Outcome::SomeFailed,
        }
        .render();
        for text in [&table, &summary] {
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "control characters reached the console: {text:?}"
            );
        }
    }
}
