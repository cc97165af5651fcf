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
        if r.relay {
            let verified = r
                .downstream
                .values()
                .filter(|d| d.state == ReceiverState::Done)
                .count();
            lines.push(format!(
                "    relay: {} local receiver(s), {verified} verified",
                r.downstream.len()
            ));
        }
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
                    (ReceiverState::Done, _) if r.relay => "relayed: its copy verified".to_string(),
                    (ReceiverState::Done, _) => "verified".to_string(),
                    (_, Some(why)) => printable(&why.to_string()),
                    _ => "unknown".to_string(),
                }
            ));
            // A relay's local receivers, as it reported them.
            for d in r.downstream.values() {
                out.push_str(&format!(
                    "    via {:<14} {:<18} {:<10} {:>8} {:>9}  {}\n",
                    display_name(&r.name, r.id),
                    display_name(&d.name, d.id),
                    state_name(d.state),
                    "-",
                    "-",
                    match d.state {
                        ReceiverState::Done => "verified".to_string(),
                        _ if !d.reason.is_empty() => printable(&d.reason),
                        _ => "unknown".to_string(),
                    }
                ));
            }
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
    /// Since the receive started (waiting for a session included).
    pub elapsed: Duration,
    pub verifying: bool,
    /// Bytes of data chunks written (zeroed and absent chunks cost no network time).
    pub data_written: u64,
    /// Since the image's manifest was known: the time the data took.
    pub receiving_for: Duration,
    /// Blocks this receiver missed and got back from a repair.
    pub repairs: u64,
}

impl ReceiveProgress {
    pub fn percent(&self) -> f64 {
        if self.chunks_total == 0 {
            0.0
        } else {
            100.0 * f64::from(self.chunks_done) / f64::from(self.chunks_total)
        }
    }

    /// Data written per second since the data started, in MB/s.
    pub fn mb_per_s(&self) -> f64 {
        if self.receiving_for.is_zero() {
            0.0
        } else {
            mb_per_s(self.data_written, self.receiving_for)
        }
    }

    /// `42.0% (420/1000 chunks), 35.2 MB/s, 12 repairs, verifying after 12 s`
    pub fn line(&self) -> String {
        format!(
            "{:5.1}% ({}/{} chunks), {:.1} MB/s, {} repair{}{} after {:.0} s",
            self.percent(),
            self.chunks_done,
            self.chunks_total,
            self.mb_per_s(),
            self.repairs,
            if self.repairs == 1 { "" } else { "s" },
            if self.verifying { ", verifying" } else { "" },
            self.elapsed.as_secs_f64()
        )
    }
}

/// Where a live view (the sender's table, a receiver's line) is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A screen (a virtual terminal, a terminal emulator): each update redraws the previous one
    /// in place. `rows` is its height when known; a taller view is cut to fit.
    Screen { rows: Option<u16> },
    /// A serial console, a pipe, a log file: each update is printed below the last, whole.
    Lines,
}

/// Cursor up `n` lines (CUU), to the first column, then erase to the end of the screen (ED):
/// what the Linux console and every terminal emulator understand.
fn erase_last_lines(n: usize) -> String {
    format!("\x1b[{n}A\r\x1b[J")
}

/// Successive updates of one live view on one output. On a [`Output::Screen`] an update
/// replaces the lines the previous one drew, unless something else was printed below them
/// meanwhile ([`LiveView::interrupted`]): then it starts afresh underneath.
#[derive(Debug, Clone)]
pub struct LiveView {
    output: Output,
    /// Lines the previous update left at the bottom of the screen.
    drawn: usize,
}

impl LiveView {
    pub fn new(output: Output) -> Self {
        Self { output, drawn: 0 }
    }

    pub fn output(&self) -> Output {
        self.output
    }

    /// Other text went to the output after the last update: the next one must not erase it.
    pub fn interrupted(&mut self) {
        self.drawn = 0;
    }

    /// The text to write for an update showing `lines` (no line breaks inside a line).
    pub fn update(&mut self, lines: &[String]) -> String {
        let mut out = String::new();
        let shown = match self.output {
            Output::Lines => lines.to_vec(),
            Output::Screen { rows } => {
                if self.drawn > 0 {
                    out.push_str(&erase_last_lines(self.drawn));
                }
                fit_rows(lines, rows)
            }
        };
        for line in &shown {
            out.push_str(line);
            out.push('\n');
        }
        if let Output::Screen { .. } = self.output {
            self.drawn = shown.len();
        }
        out
    }
}

/// Keeps a view within a screen of `rows` lines (one left for the cursor): its first lines (the
/// title and the first receivers), a line saying how many were left out, and its last line (the
/// totals).
fn fit_rows(lines: &[String], rows: Option<u16>) -> Vec<String> {
    let room = rows.map_or(usize::MAX, |r| usize::from(r).saturating_sub(1).max(3));
    if lines.len() <= room {
        return lines.to_vec();
    }
    let head = room - 2;
    let mut shown = lines[..head].to_vec();
    shown.push(format!(
        "  ... {} more line(s) than this screen holds: the serial console and the log show all",
        lines.len() - head - 1
    ));
    shown.extend(lines.last().cloned());
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskcast_proto::manifest::Manifest;
    use diskcast_proto::sender::SenderConfig;
    use diskcast_proto::wire::{Body, Packet};

    /// A sender of an image of `mib` MiB in 1 MiB chunks, created now.
    fn sender_of_mib(mib: usize) -> (Sender, Instant) {
        let image = vec![7u8; mib << 20];
        let manifest = Manifest::scan(
            &mut std::io::Cursor::new(&image),
            image.len() as u64,
            1 << 20,
            |_| {},
        )
        .unwrap();
        let now = Instant::now();
        (Sender::new(SenderConfig::default(), manifest, now), now)
    }

    #[test]
    fn names_and_serials_from_the_network_cannot_drive_the_terminal() {
        let (mut sender, now) = sender_of_mib(1);
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

    /// A screen as a VT draws it, for what the live view writes: text, `\n`, `\r`, cursor up
    /// (`ESC [ n A`) and erase to the end of the screen (`ESC [ J`).
    #[derive(Default)]
    struct Screen {
        rows: Vec<String>,
        row: usize,
        col: usize,
    }

    impl Screen {
        fn write(&mut self, text: &str) {
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\n' => {
                        self.row += 1;
                        self.col = 0;
                    }
                    '\r' => self.col = 0,
                    '\x1b' => {
                        assert_eq!(chars.next(), Some('['), "only CSI sequences: {text:?}");
                        let mut n = String::new();
                        let command = loop {
                            match chars.next() {
                                Some(d) if d.is_ascii_digit() => n.push(d),
                                Some(other) => break other,
                                None => panic!("cut CSI sequence in {text:?}"),
                            }
                        };
                        let n: usize = n.parse().unwrap_or(1);
                        match command {
                            'A' => self.row = self.row.saturating_sub(n),
                            'J' => {
                                self.rows.truncate(self.row + 1);
                                if let Some(line) = self.rows.get_mut(self.row) {
                                    line.truncate(self.col);
                                }
                            }
                            other => panic!("unexpected CSI {other:?} in {text:?}"),
                        }
                    }
                    c => {
                        while self.rows.len() <= self.row {
                            self.rows.push(String::new());
                        }
                        let line = &mut self.rows[self.row];
                        assert_eq!(line.len(), self.col, "overwriting mid-line");
                        line.push(c);
                        self.col += 1;
                    }
                }
            }
        }

        fn text(&self) -> Vec<&str> {
            let mut rows: Vec<&str> = self.rows.iter().map(String::as_str).collect();
            while rows.last() == Some(&"") {
                rows.pop();
            }
            rows
        }
    }

    fn table(title: &str, receivers: usize) -> Vec<String> {
        std::iter::once(format!("{title}:"))
            .chain((0..receivers).map(|i| format!("  receiver {i}  {title}")))
            .chain(std::iter::once(format!("  total: {receivers}")))
            .collect()
    }

    #[test]
    fn a_screen_redraws_the_table_in_place() {
        let mut view = LiveView::new(Output::Screen { rows: None });
        let mut screen = Screen::default();
        screen.write("master: sending /dev/vda\n");
        let first = view.update(&table("first", 3));
        assert!(!first.contains('\x1b'), "nothing to erase yet: {first:?}");
        screen.write(&first);
        let second = view.update(&table("second", 3));
        assert!(second.starts_with("\x1b[5A\r\x1b[J"), "{second:?}");
        screen.write(&second);
        // Fewer lines than before: the old table's rest is erased too.
        screen.write(&view.update(&table("third", 1)));
        let mut expected = vec!["master: sending /dev/vda"];
        let third = table("third", 1);
        expected.extend(third.iter().map(String::as_str));
        assert_eq!(screen.text(), expected);
    }

    #[test]
    fn text_printed_between_updates_stays_on_the_screen() {
        let mut view = LiveView::new(Output::Screen { rows: None });
        let mut screen = Screen::default();
        screen.write(&view.update(&table("first", 2)));
        screen.write("diskcast[  3.000] INFO  a receiver was dropped\n");
        view.interrupted();
        let next = view.update(&table("second", 2));
        assert!(!next.contains('\x1b'), "{next:?}");
        screen.write(&next);
        let rows = screen.text();
        assert_eq!(rows.len(), 4 + 1 + 4, "{rows:#?}");
        assert_eq!(rows[4], "diskcast[  3.000] INFO  a receiver was dropped");
        assert_eq!(rows[5], "second:");
    }

    #[test]
    fn a_serial_line_or_a_log_gets_every_update_as_plain_lines() {
        let mut view = LiveView::new(Output::Lines);
        let mut all = String::new();
        for title in ["first", "second", "third"] {
            let text = view.update(&table(title, 2));
            assert_eq!(text, table(title, 2).join("\n") + "\n");
            all.push_str(&text);
        }
        assert!(!all.chars().any(|c| c.is_control() && c != '\n'), "{all:?}");
        assert_eq!(all.lines().count(), 3 * 4);
    }

    #[test]
    fn a_table_taller_than_the_screen_is_cut_to_fit() {
        let mut view = LiveView::new(Output::Screen { rows: Some(10) });
        let lines = table("big", 30);
        let first = view.update(&lines);
        let shown: Vec<&str> = first.lines().collect();
        assert_eq!(shown.len(), 9, "{first}");
        assert_eq!(
            shown[..7],
            lines[..7].iter().map(String::as_str).collect::<Vec<_>>()[..]
        );
        assert!(shown[7].contains("24 more line(s)"), "{}", shown[7]);
        assert_eq!(shown[8], "  total: 30");
        // The next update erases exactly what was drawn.
        assert!(view.update(&lines).starts_with("\x1b[9A\r\x1b[J"));
        let mut screen = Screen::default();
        let mut view = LiveView::new(Output::Screen { rows: Some(10) });
        for _ in 0..3 {
            screen.write(&view.update(&lines));
        }
        assert_eq!(screen.text(), shown);
    }

    #[test]
    fn the_sender_table_redraws_as_one_table() {
        let (mut sender, now) = sender_of_mib(4);
        let mut screen = Screen::default();
        let mut view = LiveView::new(Output::Screen { rows: Some(25) });
        for receiver in 1..=3u64 {
            let join = Packet {
                session: 1,
                body: Body::Join {
                    receiver,
                    incarnation: 1,
                    disk_size: 1 << 30,
                    logical_block: 512,
                    refusal: 0,
                    name: format!("pc-{receiver}"),
                    serial: String::new(),
                },
            }
            .emit();
            let from = format!("10.0.0.{receiver}:7744").parse().unwrap();
            sender.handle_datagram(&join, from, now);
            screen.write(&view.update(&progress_table(&sender, now)));
        }
        let rows = screen.text();
        assert_eq!(rows.len(), 1 + 3 + 1, "{rows:#?}");
        assert!(rows[0].contains("receiver") && rows[0].contains("repairs"));
        for (row, name) in rows[1..4].iter().zip(["pc-1", "pc-2", "pc-3"]) {
            assert!(row.contains(name), "{rows:#?}");
        }
        assert!(
            rows[4].contains("waiting for receivers: 3 joined"),
            "{rows:#?}"
        );
    }

    #[test]
    fn the_receiver_line_shows_rate_and_repairs() {
        let progress = ReceiveProgress {
            chunks_done: 21,
            chunks_total: 50,
            image_size: 50 << 20,
            elapsed: Duration::from_secs(12),
            verifying: false,
            data_written: 40_000_000,
            receiving_for: Duration::from_secs(4),
            repairs: 17,
        };
        assert_eq!(
            progress.line(),
            " 42.0% (21/50 chunks), 10.0 MB/s, 17 repairs after 12 s"
        );
        let waiting = ReceiveProgress {
            receiving_for: Duration::ZERO,
            data_written: 0,
            repairs: 1,
            verifying: true,
            ..progress
        };
        assert_eq!(
            waiting.line(),
            " 42.0% (21/50 chunks), 0.0 MB/s, 1 repair, verifying after 12 s"
        );
    }
}
