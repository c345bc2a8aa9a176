//! What a gRPC exchange costs, layer by layer: the bytes one side of an
//! HTTP/2 connection wrote, taken apart into the connection preface,
//! SETTINGS, HEADERS (request and response headers, trailers), the frame
//! headers of DATA frames, gRPC's 5-byte message prefixes, the messages
//! themselves, and flow control (WINDOW_UPDATE) and PING frames.

use std::collections::HashMap;
use std::fmt;

/// HTTP/2's client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Every frame starts with a 9-byte header.
const FRAME_HEADER: u64 = 9;
/// gRPC puts a compressed flag and a 4-byte length before each message.
const GRPC_PREFIX: u64 = 5;

/// Bytes of one direction, by layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layers {
    /// The connection preface.
    pub preface: u64,
    /// SETTINGS frames (and their acknowledgements).
    pub settings: u64,
    /// HEADERS and CONTINUATION frames, frame headers included.
    pub headers: u64,
    /// The 9-byte headers of DATA frames.
    pub data_frames: u64,
    /// gRPC message prefixes.
    pub grpc_prefix: u64,
    /// The messages (compressed where they were sent compressed).
    pub messages: u64,
    /// WINDOW_UPDATE frames.
    pub flow_control: u64,
    /// PING frames.
    pub pings: u64,
    /// Everything else (RST_STREAM, GOAWAY, ...), and bytes not framed.
    pub other: u64,
}

impl Layers {
    /// Takes `bytes` apart: what one side of a connection wrote, from any
    /// frame boundary (from the preface when it is the client's from the
    /// start).
    pub fn of(mut bytes: &[u8]) -> Layers {
        let mut l = Layers::default();
        if let Some(rest) = bytes.strip_prefix(PREFACE) {
            l.preface = PREFACE.len() as u64;
            bytes = rest;
        }
        // Per stream: bytes of the current gRPC message still to come.
        let mut pending: HashMap<u32, u64> = HashMap::new();
        while bytes.len() >= FRAME_HEADER as usize {
            let len = u64::from(bytes[0]) << 16 | u64::from(bytes[1]) << 8 | u64::from(bytes[2]);
            let kind = bytes[3];
            let flags = bytes[4];
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
            let total = FRAME_HEADER + len;
            if (bytes.len() as u64) < total {
                break;
            }
            let payload = &bytes[FRAME_HEADER as usize..total as usize];
            match kind {
                0 => {
                    l.data_frames += FRAME_HEADER;
                    // PADDED: a pad length byte and the padding are frame
                    // overhead too.
                    let mut p = payload;
                    if flags & 0x8 != 0 && !p.is_empty() {
                        let pad = usize::from(p[0]).min(p.len() - 1);
                        l.data_frames += 1 + pad as u64;
                        p = &p[1..p.len() - pad];
                    }
                    let left = pending.entry(stream).or_insert(0);
                    while !p.is_empty() {
                        if *left == 0 {
                            if p.len() < GRPC_PREFIX as usize {
                                l.other += p.len() as u64;
                                break;
                            }
                            l.grpc_prefix += GRPC_PREFIX;
                            *left = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
                            p = &p[GRPC_PREFIX as usize..];
                            continue;
                        }
                        let take = (*left).min(p.len() as u64);
                        l.messages += take;
                        *left -= take;
                        p = &p[take as usize..];
                    }
                }
                1 | 9 => l.headers += total,
                4 => l.settings += total,
                6 => l.pings += total,
                8 => l.flow_control += total,
                _ => l.other += total,
            }
            bytes = &bytes[total as usize..];
        }
        l.other += bytes.len() as u64;
        l
    }

    /// Every byte.
    pub fn total(&self) -> u64 {
        self.preface
            + self.settings
            + self.headers
            + self.data_frames
            + self.grpc_prefix
            + self.messages
            + self.flow_control
            + self.pings
            + self.other
    }

    /// The layers with names, in order.
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("connection preface", self.preface),
            ("SETTINGS frames", self.settings),
            ("HEADERS frames (headers, trailers)", self.headers),
            ("DATA frame headers", self.data_frames),
            ("gRPC message prefixes", self.grpc_prefix),
            ("the messages", self.messages),
            ("WINDOW_UPDATE frames", self.flow_control),
            ("PING frames", self.pings),
            ("other", self.other),
        ]
    }
}

/// One exchange taken apart: what the client sent and what it received.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exchange {
    /// Client to server.
    pub sent: Layers,
    /// Server to client.
    pub received: Layers,
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<40} {:>8} {:>8} {:>8}",
            "layer", "sent", "received", "share"
        )?;
        let all = (self.sent.total() + self.received.total()).max(1) as f64;
        for ((name, s), (_, r)) in self.sent.named().iter().zip(self.received.named()) {
            if *s + r == 0 {
                continue;
            }
            writeln!(
                f,
                "{:<40} {:>8} {:>8} {:>7.1}%",
                name,
                s,
                r,
                (*s + r) as f64 * 100.0 / all
            )?;
        }
        writeln!(
            f,
            "{:<40} {:>8} {:>8}",
            "total",
            self.sent.total(),
            self.received.total()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_call_is_taken_apart_by_layer() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(4, 0, 0, &[0; 6]));
        bytes.extend(frame(1, 4, 1, &[0x82; 20]));
        // One 7-byte message split over two DATA frames.
        let mut message = vec![0, 0, 0, 0, 7];
        message.extend_from_slice(b"abc");
        bytes.extend(frame(0, 0, 1, &message));
        bytes.extend(frame(0, 1, 1, b"defg"));
        bytes.extend(frame(8, 0, 0, &[0, 0, 1, 0]));
        bytes.extend(frame(6, 0, 0, &[0; 8]));
        let l = Layers::of(&bytes);
        assert_eq!(l.preface, 24);
        assert_eq!(l.settings, 15);
        assert_eq!(l.headers, 29);
        assert_eq!(l.data_frames, 18);
        assert_eq!(l.grpc_prefix, 5);
        assert_eq!(l.messages, 7);
        assert_eq!(l.flow_control, 13);
        assert_eq!(l.pings, 17);
        assert_eq!(l.other, 0);
        assert_eq!(l.total(), bytes.len() as u64);
    }

    #[test]
    fn a_cut_frame_counts_as_other() {
        let mut bytes = frame(1, 4, 1, &[0x82; 20]);
        bytes.extend_from_slice(&[0, 0, 9, 0]);
        let l = Layers::of(&bytes);
        assert_eq!(l.headers, 29);
        assert_eq!(l.other, 4);
        assert_eq!(l.total(), bytes.len() as u64);
    }
}
