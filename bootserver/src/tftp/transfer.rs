//! The sans-IO state machine of one read transfer, driven by the caller's clock.
//!
//! The caller feeds it datagrams from the client ([`Transfer::handle_packet`]) and timer expiries
//! ([`Transfer::handle_timeout`]), and sends whatever [`Transfer::poll_transmit`] yields until
//! [`Transfer::is_finished`]. The file is held in memory (see the module doc of `tftp`).
//!
//! Protocol choices:
//! - Options: blksize is granted up to `max_block_size`, windowsize up to `max_window_size`, tsize
//!   is answered with the file's length; the client's `timeout` is ignored (not acknowledged) and
//!   so are unknown options. If anything is acknowledged, an OACK goes first and the transfer
//!   waits for ACK 0; otherwise DATA 1 goes at once.
//! - Windows (RFC 7440): a window of `windowsize` blocks is sent, then the server waits for the ACK
//!   of its last block. An ACK inside the window acknowledges up to that block and the window
//!   restarts right after it. A repeated ACK of the last acknowledged block restarts the window
//!   once, unless the blocks it answers were themselves sent twice: that keeps one lost packet
//!   cheap without the Sorcerer's Apprentice doubling (RFC 1350 errata) that answering every
//!   duplicate causes. ACKs older than that, or of blocks not yet sent, are ignored.
//! - Time: the server's own `timeout`; `retries` timeouts in a row without progress end the
//!   transfer, every one before that retransmits the OACK or the window.
//! - An ERROR from the client ends the transfer at once (a firmware's size probe answers the OACK
//!   that way). DATA, OACK or a request from the client is a protocol error: ERROR 4, end.
//! - Block numbers wrap from 65535 to 0. The last block is shorter than blksize, empty when the
//!   file is an exact multiple of it.

use super::packet::{self, ErrorCode, Options, Packet, Request};
use super::TftpLimits;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the transfer agreed with the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// Whether an OACK was sent (some option was acknowledged).
    pub oack: bool,
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The last block was acknowledged.
    Completed { bytes: u64, blocks: u64 },
    /// The client sent an ERROR packet. `after_oack` with nothing sent yet is a size probe.
    ClientError {
        code: ErrorCode,
        message: String,
        after_oack: bool,
    },
    /// `retries` timeouts in a row without progress.
    TimedOut { acked_blocks: u64 },
    /// The client sent something a read transfer cannot take; an ERROR was queued for it.
    ProtocolError { reason: &'static str },
}

#[derive(Debug)]
enum Phase {
    /// OACK sent, waiting for ACK 0.
    AwaitOackAck(Vec<u8>),
    Data,
}

#[derive(Debug)]
pub struct Transfer {
    data: Arc<[u8]>,
    negotiated: Negotiated,
    phase: Phase,
    /// Number of the final block (1-based, before wrapping).
    last_block: u64,
    /// Highest block acknowledged in order (0: none).
    acked: u64,
    /// Highest block sent.
    sent: u64,
    outbox: VecDeque<Vec<u8>>,
    deadline: Option<Instant>,
    timeout: Duration,
    retries: u32,
    /// Timeouts in a row without progress.
    timeouts: u32,
    /// Whether the packets now awaiting an ACK went out more than once.
    resent: bool,
    /// Whether a duplicate ACK may restart the window (see the module doc).
    dup_restart_allowed: bool,
    retransmitted: u64,
    outcome: Option<Outcome>,
}

impl Transfer {
    /// Starts serving `data` for `request` (a read request; the caller checks the kind). The
    /// first packet (OACK or DATA 1's window) is queued for [`Transfer::poll_transmit`].
    pub fn new(request: &Request, data: Arc<[u8]>, limits: &TftpLimits, now: Instant) -> Self {
        let asked = &request.options;
        let max_block = limits.max_block_size.max(packet::BLKSIZE_RANGE.0);
        let blksize = asked
            .blksize
            .map(|b| b.clamp(packet::BLKSIZE_RANGE.0, max_block));
        let windowsize = asked
            .windowsize
            .map(|w| w.clamp(1, limits.max_window_size.max(1)));
        let answer = Options {
            blksize,
            timeout: None,
            tsize: asked.tsize.map(|_| data.len() as u64),
            windowsize,
            unknown: Vec::new(),
        };
        let negotiated = Negotiated {
            blksize: blksize.unwrap_or(512),
            windowsize: windowsize.unwrap_or(1),
            oack: !answer.is_empty(),
        };
        let last_block = data.len() as u64 / u64::from(negotiated.blksize) + 1;
        let mut transfer = Self {
            data,
            negotiated,
            phase: Phase::Data,
            last_block,
            acked: 0,
            sent: 0,
            outbox: VecDeque::new(),
            deadline: None,
            timeout: limits.timeout,
            retries: limits.retries.max(1),
            timeouts: 0,
            resent: false,
            dup_restart_allowed: true,
            retransmitted: 0,
            outcome: None,
        };
        if negotiated.oack {
            let oack = Packet::Oack(answer).to_bytes();
            transfer.outbox.push_back(oack.clone());
            transfer.phase = Phase::AwaitOackAck(oack);
        } else {
            transfer.send_window(1);
        }
        transfer.deadline = Some(now + transfer.timeout);
        transfer
    }

    /// A datagram from the client (the caller filters by source address).
    pub fn handle_packet(&mut self, datagram: &[u8], now: Instant) {
        if self.outcome.is_some() {
            return;
        }
        match packet::parse(datagram) {
            Ok(Packet::Ack { block }) => self.on_ack(block, now),
            Ok(Packet::Error { code, message }) => {
                let after_oack = matches!(self.phase, Phase::AwaitOackAck(_));
                self.finish(Outcome::ClientError {
                    code,
                    message,
                    after_oack,
                });
            }
            Ok(Packet::Data { .. } | Packet::Oack(_) | Packet::Request(_)) => {
                let reason = "only ACK and ERROR belong in a read transfer";
                self.finish(Outcome::ProtocolError { reason });
                self.outbox
                    .push_back(packet::error_packet(ErrorCode::IllegalOperation, reason));
            }
            // Garbage on the transfer's port changes nothing.
            Err(_) => {}
        }
    }

    /// The timer from [`Transfer::poll_timeout`] fired (early calls are ignored).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(deadline) if self.outcome.is_none() && now >= deadline => {}
            _ => return,
        }
        self.timeouts += 1;
        if self.timeouts >= self.retries {
            self.finish(Outcome::TimedOut {
                acked_blocks: self.acked,
            });
            return;
        }
        match &self.phase {
            Phase::AwaitOackAck(oack) => {
                self.outbox.push_back(oack.clone());
                self.retransmitted += 1;
            }
            Phase::Data => {
                let before = self.outbox.len();
                self.send_window(self.acked + 1);
                self.retransmitted += (self.outbox.len() - before) as u64;
            }
        }
        self.resent = true;
        self.deadline = Some(now + self.timeout);
    }

    /// The next datagram to send to the client.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    /// When [`Transfer::handle_timeout`] is due; `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.outcome.is_some() {
            None
        } else {
            self.deadline
        }
    }

    /// Finished: nothing more will happen once [`Transfer::poll_transmit`] is drained.
    pub fn is_finished(&self) -> bool {
        self.outcome.is_some()
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// Packets sent more than once (OACKs and DATA).
    pub fn retransmitted(&self) -> u64 {
        self.retransmitted
    }

    pub fn file_len(&self) -> u64 {
        self.data.len() as u64
    }

    fn on_ack(&mut self, block: u16, now: Instant) {
        if let Phase::AwaitOackAck(_) = self.phase {
            if block == 0 {
                self.phase = Phase::Data;
                self.progress(now);
                self.send_window(1);
            }
            return;
        }
        // The block this ACK names, among those from `acked` to `sent` (a window is far shorter
        // than the 65536 numbers, so at most one candidate fits).
        let back = u64::from((self.sent as u16).wrapping_sub(block));
        if back > self.sent - self.acked {
            return; // older than the last acknowledged block, or never sent
        }
        let n = self.sent - back;
        if n > self.acked {
            self.acked = n;
            if n == self.last_block {
                self.finish(Outcome::Completed {
                    bytes: self.file_len(),
                    blocks: self.last_block,
                });
                return;
            }
            let old_sent = self.sent;
            self.progress(now);
            self.send_window(n + 1);
            if n < old_sent {
                // The client saw a gap: the window restarts right after its ACK and repeats
                // blocks it may hold. It may well ACK the same block again for every block after
                // the gap: those echoes must not restart the window once more.
                self.resent = true;
                self.dup_restart_allowed = false;
                self.retransmitted += old_sent - n;
            }
        } else if self.dup_restart_allowed {
            let before = self.outbox.len();
            self.send_window(self.acked + 1);
            self.retransmitted += (self.outbox.len() - before) as u64;
            self.resent = true;
            self.dup_restart_allowed = false;
            self.deadline = Some(now + self.timeout);
        }
    }

    /// Bookkeeping when an ACK moves the transfer forward.
    fn progress(&mut self, now: Instant) {
        self.timeouts = 0;
        self.dup_restart_allowed = !self.resent;
        self.resent = false;
        self.deadline = Some(now + self.timeout);
    }

    /// Queues the window of blocks starting at `first`.
    fn send_window(&mut self, first: u64) {
        let last = (first + u64::from(self.negotiated.windowsize) - 1).min(self.last_block);
        for block in first..=last {
            let size = usize::from(self.negotiated.blksize);
            let start = (block as usize - 1).saturating_mul(size);
            let end = start.saturating_add(size).min(self.data.len());
            let data = self.data.get(start..end).unwrap_or_default();
            self.outbox.push_back(
                Packet::Data {
                    block: block as u16,
                    data,
                }
                .to_bytes(),
            );
        }
        self.sent = self.sent.max(last);
    }

    fn finish(&mut self, outcome: Outcome) {
        self.outbox.clear();
        self.deadline = None;
        self.outcome = Some(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::packet::RequestKind;

    const SECOND: Duration = Duration::from_secs(1);

    fn limits() -> TftpLimits {
        TftpLimits {
            timeout: SECOND,
            retries: 5,
            ..TftpLimits::default()
        }
    }

    fn request(options: Options) -> Request {
        Request {
            kind: RequestKind::Read,
            filename: "f".into(),
            options,
        }
    }

    fn file(len: usize) -> Arc<[u8]> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn ack(block: u16) -> Vec<u8> {
        Packet::Ack { block }.to_bytes()
    }

    /// What the server sent, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Sent {
        Data(u16, Vec<u8>),
        Oack(Options),
        Error(ErrorCode),
    }

    fn drain(transfer: &mut Transfer) -> Vec<Sent> {
        std::iter::from_fn(|| transfer.poll_transmit())
            .map(|datagram| match packet::parse(&datagram) {
                Ok(Packet::Data { block, data }) => Sent::Data(block, data.to_vec()),
                Ok(Packet::Oack(options)) => Sent::Oack(options),
                Ok(Packet::Error { code, .. }) => Sent::Error(code),
                other => panic!("server sent {other:?}"),
            })
            .collect()
    }

    /// A receiver per RFC 7440: ACKs the end of each window, the short last block, and the last
    /// in-order block when something arrives out of order or again.
    struct Client {
        blksize: usize,
        windowsize: usize,
        expected: u16,
        in_window: usize,
        received: Vec<u8>,
        done: bool,
    }

    impl Client {
        fn new() -> Self {
            Self {
                blksize: 512,
                windowsize: 1,
                expected: 1,
                in_window: 0,
                received: Vec::new(),
                done: false,
            }
        }

        fn receive(&mut self, sent: &Sent) -> Option<Vec<u8>> {
            match sent {
                Sent::Oack(options) => {
                    self.blksize = options.blksize.map_or(512, usize::from);
                    self.windowsize = options.windowsize.map_or(1, usize::from);
                    Some(ack(0))
                }
                Sent::Data(block, data) if *block == self.expected && !self.done => {
                    self.received.extend_from_slice(data);
                    self.expected = self.expected.wrapping_add(1);
                    self.in_window += 1;
                    self.done = data.len() < self.blksize;
                    if self.done || self.in_window == self.windowsize {
                        self.in_window = 0;
                        return Some(ack(*block));
                    }
                    None
                }
                Sent::Data(..) => {
                    self.in_window = 0;
                    Some(ack(self.expected.wrapping_sub(1)))
                }
                Sent::Error(code) => panic!("server sent ERROR {code:?}"),
            }
        }
    }

    /// Runs a transfer to its end over a network that drops what `lose` says (server-to-client
    /// packets as `(true, packet)`, ACKs as `(false, packet)`). Returns the client, the server's
    /// DATA count and the simulated time taken.
    fn run(
        transfer: &mut Transfer,
        start: Instant,
        mut lose: impl FnMut(bool, &Sent) -> bool,
    ) -> (Client, usize, Duration) {
        let mut client = Client::new();
        let mut now = start;
        let mut data_sent = 0;
        while !transfer.is_finished() {
            let sent = drain(transfer);
            if sent.is_empty() {
                now = transfer
                    .poll_timeout()
                    .expect("a running transfer has a timer");
                transfer.handle_timeout(now);
                continue;
            }
            for packet in sent {
                data_sent += usize::from(matches!(packet, Sent::Data(..)));
                if lose(true, &packet) {
                    continue;
                }
                if let Some(reply) = client.receive(&packet) {
                    let parsed = packet::parse(&reply).map(|p| match p {
                        Packet::Ack { block } => Sent::Data(block, Vec::new()),
                        _ => unreachable!(),
                    });
                    if !lose(false, &parsed.unwrap()) {
                        transfer.handle_packet(&reply, now);
                    }
                }
            }
        }
        (client, data_sent, now - start)
    }

    fn lossless(_: bool, _: &Sent) -> bool {
        false
    }

    fn completed(transfer: &Transfer) -> bool {
        matches!(transfer.outcome(), Some(Outcome::Completed { .. }))
    }

    #[test]
    fn plain_512_in_lock_step() {
        let now = Instant::now();
        let data = file(1300);
        let mut transfer =
            Transfer::new(&request(Options::default()), data.clone(), &limits(), now);
        assert_eq!(
            transfer.negotiated(),
            Negotiated {
                blksize: 512,
                windowsize: 1,
                oack: false
            }
        );
        assert_eq!(
            drain(&mut transfer),
            vec![Sent::Data(1, data[..512].to_vec())]
        );
        transfer.handle_packet(&ack(1), now);
        assert_eq!(
            drain(&mut transfer),
            vec![Sent::Data(2, data[512..1024].to_vec())]
        );
        transfer.handle_packet(&ack(2), now);
        assert_eq!(
            drain(&mut transfer),
            vec![Sent::Data(3, data[1024..].to_vec())]
        );
        assert!(!transfer.is_finished());
        transfer.handle_packet(&ack(3), now);
        assert_eq!(
            transfer.outcome(),
            Some(&Outcome::Completed {
                bytes: 1300,
                blocks: 3
            })
        );
        assert_eq!(transfer.poll_timeout(), None);
        assert_eq!(transfer.poll_transmit(), None);
    }

    #[test]
    fn options_are_clamped_and_the_client_timeout_is_not_acknowledged() {
        let now = Instant::now();
        let data = file(100_000);
        let asked = Options {
            blksize: Some(9000),
            timeout: Some(255),
            tsize: Some(0),
            windowsize: Some(64),
            unknown: vec![("multicast".into(), String::new())],
        };
        let mut transfer = Transfer::new(&request(asked), data.clone(), &limits(), now);
        let oack = Options {
            blksize: Some(1468),
            tsize: Some(100_000),
            windowsize: Some(16),
            ..Options::default()
        };
        assert_eq!(drain(&mut transfer), vec![Sent::Oack(oack)]);
        transfer.handle_packet(&ack(0), now);
        let window = drain(&mut transfer);
        assert_eq!(window.len(), 16);
        assert_eq!(
            window[15],
            Sent::Data(16, data[15 * 1468..16 * 1468].to_vec())
        );
        // Smaller requests are granted as asked.
        let asked = Options {
            blksize: Some(1024),
            windowsize: Some(4),
            ..Options::default()
        };
        let mut transfer = Transfer::new(&request(asked), data.clone(), &limits(), now);
        let (client, _, took) = run(&mut transfer, now, lossless);
        assert_eq!((client.blksize, client.windowsize), (1024, 4));
        assert_eq!(&client.received[..], &data[..]);
        assert!(completed(&transfer));
        assert_eq!(took, Duration::ZERO);
    }

    #[test]
    fn size_probe_ended_by_an_error_stops_at_once() {
        let now = Instant::now();
        let asked = Options {
            tsize: Some(0),
            ..Options::default()
        };
        let mut transfer = Transfer::new(&request(asked), file(4096), &limits(), now);
        let expected = Options {
            tsize: Some(4096),
            ..Options::default()
        };
        assert_eq!(drain(&mut transfer), vec![Sent::Oack(expected)]);
        let probe_end = packet::error_packet(ErrorCode::OptionNegotiation, "tsize probe");
        transfer.handle_packet(&probe_end, now);
        assert!(transfer.is_finished());
        assert!(matches!(
            transfer.outcome(),
            Some(Outcome::ClientError {
                code: ErrorCode::OptionNegotiation,
                after_oack: true,
                ..
            })
        ));
        assert_eq!(transfer.poll_timeout(), None);
        transfer.handle_timeout(now + 10 * SECOND);
        transfer.handle_packet(&ack(0), now);
        assert_eq!(transfer.poll_transmit(), None);
    }

    #[test]
    fn lost_data_is_sent_again_after_the_timeout() {
        let start = Instant::now();
        let data = file(5000);
        let mut transfer =
            Transfer::new(&request(Options::default()), data.clone(), &limits(), start);
        let mut dropped = false;
        let (client, data_sent, took) = run(&mut transfer, start, |to_client, sent| {
            let lose = to_client && !dropped && matches!(sent, Sent::Data(3, _));
            dropped |= lose;
            lose
        });
        assert_eq!(&client.received[..], &data[..]);
        assert_eq!((data_sent, transfer.retransmitted()), (11, 1));
        assert_eq!(took, SECOND);
    }

    #[test]
    fn lost_ack_is_recovered_by_a_retransmission() {
        let start = Instant::now();
        let data = file(5000);
        let mut transfer =
            Transfer::new(&request(Options::default()), data.clone(), &limits(), start);
        let mut dropped = false;
        let (client, _, took) = run(&mut transfer, start, |to_client, sent| {
            let lose = !to_client && !dropped && matches!(sent, Sent::Data(2, _));
            dropped |= lose;
            lose
        });
        assert_eq!(&client.received[..], &data[..]);
        assert_eq!(transfer.retransmitted(), 1);
        assert_eq!(took, SECOND);
    }

    #[test]
    fn a_gap_in_a_window_restarts_it_without_waiting() {
        let start = Instant::now();
        let data = file(40 * 512);
        let asked = Options {
            windowsize: Some(8),
            ..Options::default()
        };
        let mut transfer = Transfer::new(&request(asked), data.clone(), &limits(), start);
        let mut dropped = false;
        let (client, data_sent, took) = run(&mut transfer, start, |to_client, sent| {
            let lose = to_client && !dropped && matches!(sent, Sent::Data(11, _));
            dropped |= lose;
            lose
        });
        assert_eq!(&client.received[..], &data[..]);
        assert_eq!(
            took,
            Duration::ZERO,
            "restarted on the client's ACK 10, no timeout"
        );
        // Blocks 12..=16 arrived out of order and went again with the restarted window.
        assert_eq!(data_sent, 41 + 6);
    }

    #[test]
    fn duplicated_acks_do_not_snowball() {
        // A network that delivers every ACK twice (the Sorcerer's Apprentice setting).
        let start = Instant::now();
        let data = file(200 * 512);
        let mut transfer =
            Transfer::new(&request(Options::default()), data.clone(), &limits(), start);
        let mut client = Client::new();
        let mut data_sent = 0;
        while !transfer.is_finished() {
            let sent = drain(&mut transfer);
            assert!(!sent.is_empty(), "stalled");
            for packet in sent {
                data_sent += 1;
                if let Some(reply) = client.receive(&packet) {
                    transfer.handle_packet(&reply, start);
                    transfer.handle_packet(&reply, start);
                }
            }
        }
        assert_eq!(&client.received[..], &data[..]);
        assert!(
            data_sent <= 201 * 3 / 2,
            "{data_sent} DATA packets for 201 blocks"
        );
    }

    #[test]
    fn acks_for_blocks_not_sent_or_long_acknowledged_are_ignored() {
        let now = Instant::now();
        let mut transfer = Transfer::new(&request(Options::default()), file(5000), &limits(), now);
        drain(&mut transfer);
        for block in [2, 5, 65535, 30000] {
            transfer.handle_packet(&ack(block), now);
            assert_eq!(transfer.poll_transmit(), None, "ACK {block}");
        }
        transfer.handle_packet(&ack(1), now);
        assert!(matches!(drain(&mut transfer)[..], [Sent::Data(2, _)]));
        transfer.handle_packet(&ack(1), now); // restarts once
        transfer.handle_packet(&ack(1), now); // then not again
        assert!(matches!(drain(&mut transfer)[..], [Sent::Data(2, _)]));
        transfer.handle_packet(&ack(0), now);
        assert_eq!(transfer.poll_transmit(), None);
        assert!(!transfer.is_finished());
    }

    #[test]
    fn a_silent_client_is_dropped_after_retries_timeouts_whatever_its_timeout_option() {
        for asked in [
            // Options beside timeout: OACK, then nothing.
            Options {
                timeout: Some(255),
                tsize: Some(0),
                blksize: Some(1468),
                ..Options::default()
            },
            // timeout alone is not acknowledged: no OACK, DATA 1 at once.
            Options {
                timeout: Some(255),
                ..Options::default()
            },
        ] {
            let start = Instant::now();
            let oack_expected = asked.blksize.is_some();
            let mut transfer = Transfer::new(&request(asked), file(5000), &limits(), start);
            let mut sends = 0;
            let mut now = start;
            loop {
                for sent in drain(&mut transfer) {
                    assert!(matches!(sent, Sent::Oack(_)) == oack_expected, "{sent:?}");
                    if let Sent::Oack(options) = sent {
                        assert_eq!(options.timeout, None);
                    }
                    sends += 1;
                }
                let Some(deadline) = transfer.poll_timeout() else {
                    break;
                };
                transfer.handle_timeout(deadline - Duration::from_millis(1)); // early: nothing
                assert_eq!(transfer.poll_transmit(), None);
                now = deadline;
                transfer.handle_timeout(now);
            }
            assert_eq!(
                transfer.outcome(),
                Some(&Outcome::TimedOut { acked_blocks: 0 })
            );
            assert_eq!(sends, 5, "the first send and 4 retransmissions");
            assert!(now - start <= 5 * SECOND, "gave up after {:?}", now - start);
        }
    }

    #[test]
    fn block_numbers_wrap_to_zero() {
        // blksize 8 wraps after 512 KiB; windows of 16 straddle the wrap.
        let start = Instant::now();
        let data = file(70_000 * 8 + 3);
        let asked = Options {
            blksize: Some(8),
            windowsize: Some(16),
            ..Options::default()
        };
        let mut transfer = Transfer::new(&request(asked), data.clone(), &limits(), start);
        let mut wrapped = false;
        let mut lost = [false; 3];
        let (client, _, took) = run(&mut transfer, start, |to_client, sent| {
            // ACKs come in as `Sent::Data(block, [])`: DATA 0 of 8 bytes is block 65536.
            wrapped |= to_client && matches!(sent, Sent::Data(0, d) if d.len() == 8);
            // Lose DATA 65535 (a gap restart across the wrap), then after the wrap DATA 5 (its
            // gap ACKs name block 65540, wire 4), then the next window's ACK (a timeout).
            let index = match (to_client, sent) {
                (true, Sent::Data(65535, _)) => 0,
                (true, Sent::Data(5, _)) if wrapped => 1,
                (false, Sent::Data(block, _)) if lost[1] && *block != 4 => 2,
                _ => return false,
            };
            !std::mem::replace(&mut lost[index], true)
        });
        assert!(wrapped, "block 65536 goes out as 0");
        assert_eq!(lost, [true; 3]);
        assert_eq!(took, SECOND, "one timeout, for the lost ACK");
        assert_eq!(client.received.len(), data.len());
        assert!(client.received == data[..]);
        assert_eq!(
            transfer.outcome(),
            Some(&Outcome::Completed {
                bytes: data.len() as u64,
                blocks: 70_001
            })
        );
    }

    #[test]
    fn an_exact_multiple_ends_with_an_empty_block() {
        let now = Instant::now();
        for (len, blocks) in [(1024, 3), (0, 1), (511, 1), (512, 2)] {
            let mut transfer =
                Transfer::new(&request(Options::default()), file(len), &limits(), now);
            let (client, data_sent, _) = run(&mut transfer, now, lossless);
            assert_eq!((client.received.len(), data_sent), (len, blocks));
            assert_eq!(
                transfer.outcome(),
                Some(&Outcome::Completed {
                    bytes: len as u64,
                    blocks: blocks as u64
                })
            );
        }
    }

    #[test]
    fn data_from_the_client_ends_the_transfer_with_an_error() {
        let now = Instant::now();
        let mut transfer = Transfer::new(&request(Options::default()), file(5000), &limits(), now);
        drain(&mut transfer);
        transfer.handle_packet(b"garbage", now);
        assert!(!transfer.is_finished());
        let data = Packet::Data {
            block: 1,
            data: b"x",
        }
        .to_bytes();
        transfer.handle_packet(&data, now);
        assert!(matches!(
            transfer.outcome(),
            Some(Outcome::ProtocolError { .. })
        ));
        assert_eq!(
            drain(&mut transfer),
            vec![Sent::Error(ErrorCode::IllegalOperation)]
        );
    }
}
