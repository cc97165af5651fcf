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
            // A window restarted inside the old one repeats blocks the client may hold.
            self.resent = n < old_sent;
            self.retransmitted += old_sent - n;
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
