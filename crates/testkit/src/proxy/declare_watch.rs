//! Reading the client's side of an AMQP 0-9-1 connection just far enough to
//! spot an `exchange.declare` or `queue.declare`, so that an armed stall can
//! stop a connection there. Pure byte logic; the relay in `relay` feeds it.

const PROTOCOL_HEADER_LEN: usize = 8;
/// Type (1), channel (2), payload size (4).
const FRAME_HEADER_LEN: usize = 7;
const FRAME_METHOD: u8 = 1;
/// Class and method id at the start of a method frame's payload.
const METHOD_IDS_LEN: usize = 4;
const EXCHANGE_DECLARE: (u16, u16) = (40, 10);
const QUEUE_DECLARE: (u16, u16) = (50, 10);

/// What [`DeclareWatch::feed`] decided about a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Everything up to the end of the chunk may pass (a frame's head may be held back).
    Pass,
    /// A declare claimed the stall: `out` holds what came before it, nothing after.
    Stall,
}

/// Follows the client's side of an AMQP 0-9-1 connection (protocol header, then
/// frames) across reads, holding back only the bytes of a frame's head until
/// it shows whether the frame is a declare; payloads pass through unread.
#[derive(Debug, Default)]
pub(super) struct DeclareWatch {
    greeted: bool,
    /// The incomplete protocol header or head of the current frame.
    head: Vec<u8>,
    /// Bytes of the current frame (payload and frame end) still to pass unread.
    rest: usize,
}

impl DeclareWatch {
    /// Appends to `out` the bytes of `chunk` that may be forwarded. At a declare
    /// it asks `claim_stall`: when that returns true it stops there (the declare
    /// is not forwarded); otherwise the declare passes like any frame.
    pub(super) fn feed(
        &mut self,
        mut chunk: &[u8],
        out: &mut Vec<u8>,
        mut claim_stall: impl FnMut() -> bool,
    ) -> Verdict {
        while !chunk.is_empty() {
            if self.rest > 0 {
                let n = self.rest.min(chunk.len());
                out.extend_from_slice(&chunk[..n]);
                self.rest -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (self.head_len() - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            if self.head.len() < self.head_len() {
                continue;
            }
            if !self.greeted {
                self.greeted = true;
            } else {
                if self.is_declare() && claim_stall() {
                    return Verdict::Stall;
                }
                // Payload plus frame end, less what the head already took of the payload.
                self.rest =
                    self.payload_size().saturating_add(1) - (self.head.len() - FRAME_HEADER_LEN);
            }
            out.append(&mut self.head);
        }
        Verdict::Pass
    }

    /// How long the head being collected is once complete: the protocol header,
    /// a frame header, or for a method frame the header plus class and method id.
    fn head_len(&self) -> usize {
        if !self.greeted {
            PROTOCOL_HEADER_LEN
        } else if self.head.len() < FRAME_HEADER_LEN {
            FRAME_HEADER_LEN
        } else if self.head[0] == FRAME_METHOD && self.payload_size() >= METHOD_IDS_LEN {
            FRAME_HEADER_LEN + METHOD_IDS_LEN
        } else {
            FRAME_HEADER_LEN
        }
    }

    fn payload_size(&self) -> usize {
        let size = u32::from_be_bytes([self.head[3], self.head[4], self.head[5], self.head[6]]);
        usize::try_from(size).unwrap_or(usize::MAX)
    }

    fn is_declare(&self) -> bool {
        if self.head.len() < FRAME_HEADER_LEN + METHOD_IDS_LEN || self.head[0] != FRAME_METHOD {
            return false;
        }
        let class = u16::from_be_bytes([self.head[7], self.head[8]]);
        let method = u16::from_be_bytes([self.head[9], self.head[10]]);
        matches!((class, method), EXCHANGE_DECLARE | QUEUE_DECLARE)
    }
}

#[cfg(test)]
mod tests {
    use super::{DeclareWatch, EXCHANGE_DECLARE, FRAME_METHOD, QUEUE_DECLARE, Verdict};

    const GREETING: &[u8] = b"AMQP\x00\x00\x09\x01";

    fn method_frame(channel: u16, (class, method): (u16, u16), args: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&class.to_be_bytes());
        payload.extend_from_slice(&method.to_be_bytes());
        payload.extend_from_slice(args);
        frame(FRAME_METHOD, channel, &payload)
    }

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).expect("size").to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    /// Feeds `stream` in chunks of `size` with the stall armed; returns what was
    /// forwarded and whether it stalled.
    fn feed_in_chunks(stream: &[u8], size: usize) -> (Vec<u8>, bool) {
        let mut watch = DeclareWatch::default();
        let mut out = Vec::new();
        for chunk in stream.chunks(size) {
            if watch.feed(chunk, &mut out, || true) == Verdict::Stall {
                return (out, true);
            }
        }
        (out, false)
    }

    /// The client's side up to a declare: greeting, start-ok, a heartbeat, a
    /// content body whose bytes look like a declare, channel.open.
    fn before_declare() -> Vec<u8> {
        let mut stream = GREETING.to_vec();
        stream.extend(method_frame(0, (10, 11), b"start-ok arguments"));
        stream.extend(frame(8, 0, &[]));
        stream.extend(frame(3, 1, &method_frame(1, EXCHANGE_DECLARE, b"")));
        stream.extend(method_frame(1, (20, 10), b"\x00"));
        stream
    }

    #[test]
    fn a_declare_is_held_back_and_everything_before_it_passes_however_the_bytes_are_split() {
        for declare in [EXCHANGE_DECLARE, QUEUE_DECLARE] {
            let before = before_declare();
            let mut stream = before.clone();
            stream.extend(method_frame(1, declare, b"\x00\x00\x05topic"));
            stream.extend(method_frame(1, (20, 40), b"after"));
            for size in [1, 2, 3, 7, 11, 13, stream.len()] {
                let (out, stalled) = feed_in_chunks(&stream, size);
                assert!(stalled, "chunks of {size}");
                assert_eq!(out, before, "chunks of {size}");
            }
        }
    }

    #[test]
    fn frames_other_than_declares_pass_unchanged() {
        let mut stream = before_declare();
        stream.extend(method_frame(1, (50, 20), b"queue.bind"));
        stream.extend(method_frame(1, (40, 20), b"exchange.delete"));
        for size in [1, 5, stream.len()] {
            assert_eq!(feed_in_chunks(&stream, size), (stream.clone(), false));
        }
    }

    #[test]
    fn a_declare_passes_when_the_stall_is_already_taken() {
        let mut stream = before_declare();
        stream.extend(method_frame(1, EXCHANGE_DECLARE, b"args"));
        let mut watch = DeclareWatch::default();
        let mut out = Vec::new();
        assert_eq!(watch.feed(&stream, &mut out, || false), Verdict::Pass);
        assert_eq!(out, stream);
    }
}
