//! The handover protocol's messages and their encoding (pure: no sockets, no descriptors).
//!
//! Every message is one *frame*: an 8-byte header, then `len` bytes of payload.
//!
//! ```text
//! len: u32 LE | kind: u8 | fds: u8 | reserved: u16 (0) | payload (len bytes)
//! ```
//!
//! `fds` is how many descriptors travel with the frame (SCM_RIGHTS on the same `sendmsg`, see
//! `fds.rs`), in the order the payload names them. The frame header and the `Hello` frame are
//! the same in every version: a successor reads the old process's `Hello` first, and only if
//! it reads that version does anything else follow. Integers are little-endian, strings are a
//! `u16` length and UTF-8 bytes, byte strings a `u32` length and the bytes.
//!
//! The conversation (old = the running process, new = the one started with `--takeover`):
//!
//! ```text
//! old -> new  Hello { version }            (or Refused { reason }: wrong uid, busy)
//! new -> old  Speak { version }            (or CannotRead { reads }: old falls back to a drain)
//! old -> new  Listeners { addr } + fds     one SO_REUSEPORT listener per old worker
//! new -> old  Ready                        its workers accept on them; old stops accepting
//! old -> new  Flows { batch, records } + fds      repeated
//! new -> old  Ack { batch }                new holds the descriptors, touches nothing yet
//! old -> new  Commit { batch }             old closes its copies; new adopts the flows
//! old -> new  Done { flows }               nothing left: old exits, new serves the socket
//! ```

use std::net::SocketAddr;
use std::time::Duration;

/// Identifies a Ringway handover at the start of `Hello`.
pub const MAGIC: [u8; 8] = *b"RINGWAY\x01";
/// The version this build speaks (and the only one it reads).
pub const VERSION: u16 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;
/// Largest payload accepted: a batch of flows with their pending bytes (each direction holds at
/// most a few hundred KiB at handover) stays far below this.
pub const MAX_PAYLOAD: usize = 256 << 20;
/// Most descriptors sent with one frame (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS_PER_FRAME: usize = 128;

/// A protocol violation: the peer is not a compatible Ringway, or it broke off mid-frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn error<T>(what: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(what.into()))
}

/// One direction of a flow as it stood when the old process quiesced it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipeState {
    /// The source sent EOF: nothing more will be read from it.
    pub eof: bool,
    /// The destination was shut down for writing already (after that EOF).
    pub shutdown_done: bool,
    /// Bytes read from the source and not yet written to the destination, oldest first.
    pub pending: Vec<u8>,
}

/// Everything about a flow except its descriptors, which travel beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowState {
    /// The client's address (from the PROXY header when one was read).
    pub client: SocketAddr,
    /// The backend's identity (its address text), `None` for a connection not started yet.
    pub backend: Option<String>,
    /// Bytes delivered client -> backend and backend -> client so far.
    pub bytes: [u64; 2],
    /// Time since the client was accepted.
    pub age: Duration,
    /// Time since the last byte moved either way.
    pub idle: Duration,
    /// How long the backend connect took.
    pub connect_time: Option<Duration>,
    /// Upload (client -> backend), then download.
    pub pipes: [PipeState; 2],
    /// When the old process stopped moving the flow's bytes (CLOCK_MONOTONIC, nanoseconds;
    /// the same clock in both processes): the successor measures the pause from it.
    pub quiesced_at: u64,
}

impl FlowState {
    /// A connection accepted but not started (parked): only its client descriptor moves, and
    /// the successor starts it as if it had accepted it itself.
    pub fn is_unstarted(&self) -> bool {
        self.backend.is_none()
    }

    /// Descriptors that travel with this record: the client's, then the backend's if any.
    pub fn fd_count(&self) -> usize {
        1 + usize::from(self.backend.is_some())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello { version: u16 },
    Refused { reason: String },
    Speak { version: u16 },
    CannotRead { reads: u16 },
    Listeners { addr: String, count: u8 },
    Ready,
    Flows { batch: u64, flows: Vec<FlowState> },
    Ack { batch: u64 },
    Commit { batch: u64 },
    Done { flows: u64 },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Refused { .. } => 2,
            Message::Speak { .. } => 3,
            Message::CannotRead { .. } => 4,
            Message::Listeners { .. } => 5,
            Message::Ready => 6,
            Message::Flows { .. } => 7,
            Message::Ack { .. } => 8,
            Message::Commit { .. } => 9,
            Message::Done { .. } => 10,
        }
    }

    /// Descriptors that must travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Listeners { count, .. } => usize::from(*count),
            Message::Flows { flows, .. } => flows.iter().map(FlowState::fd_count).sum(),
            _ => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Refused { .. } => "Refused",
            Message::Speak { .. } => "Speak",
            Message::CannotRead { .. } => "CannotRead",
            Message::Listeners { .. } => "Listeners",
            Message::Ready => "Ready",
            Message::Flows { .. } => "Flows",
            Message::Ack { .. } => "Ack",
            Message::Commit { .. } => "Commit",
            Message::Done { .. } => "Done",
        }
    }
}

/// The whole frame (header and payload) for `message`.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    w.0.resize(HEADER_LEN, 0);
    match message {
        Message::Hello { version } => {
            w.bytes_raw(&MAGIC);
            w.u16(*version);
        }
        Message::Refused { reason } => w.str(reason),
        Message::Speak { version } => w.u16(*version),
        Message::CannotRead { reads } => w.u16(*reads),
        Message::Listeners { addr, count } => {
            w.str(addr);
            w.u8(*count);
        }
        Message::Ready => {}
        Message::Flows { batch, flows } => {
            w.u64(*batch);
            w.u32(flows.len() as u32);
            for flow in flows {
                encode_flow(&mut w, flow);
            }
        }
        Message::Ack { batch } | Message::Commit { batch } => w.u64(*batch),
        Message::Done { flows } => w.u64(*flows),
    }
    let len = (w.0.len() - HEADER_LEN) as u32;
    w.0[0..4].copy_from_slice(&len.to_le_bytes());
    w.0[4] = message.kind();
    w.0[5] = message.fd_count().min(255) as u8;
    w.0
}

fn encode_flow(w: &mut Writer, flow: &FlowState) {
    w.str(&flow.client.to_string());
    match &flow.backend {
        Some(name) => {
            w.u8(1);
            w.str(name);
        }
        None => w.u8(0),
    }
    w.u64(flow.bytes[0]);
    w.u64(flow.bytes[1]);
    w.u64(micros(flow.age));
    w.u64(micros(flow.idle));
    w.u64(flow.connect_time.map_or(u64::MAX, micros));
    w.u64(flow.quiesced_at);
    for pipe in &flow.pipes {
        w.u8(u8::from(pipe.eof) | (u8::from(pipe.shutdown_done) << 1));
        w.u32(pipe.pending.len() as u32);
        w.bytes_raw(&pipe.pending);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1)
}

/// A frame header: payload length, message kind, descriptors attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub kind: u8,
    pub fds: usize,
}

pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > MAX_PAYLOAD {
        return error(format!(
            "a frame of {len} bytes is larger than any Ringway sends"
        ));
    }
    Ok(Header {
        len,
        kind: bytes[4],
        fds: usize::from(bytes[5]),
    })
}

/// Decodes the payload of a frame whose header is `header`.
pub fn decode(header: Header, payload: &[u8]) -> Result<Message, ProtocolError> {
    let mut r = Reader(payload);
    let message = match header.kind {
        1 => {
            if r.take(MAGIC.len())? != MAGIC {
                return error("the peer is not a Ringway handover (bad magic)");
            }
            Message::Hello { version: r.u16()? }
        }
        2 => Message::Refused { reason: r.str()? },
        3 => Message::Speak { version: r.u16()? },
        4 => Message::CannotRead { reads: r.u16()? },
        5 => Message::Listeners {
            addr: r.str()?,
            count: r.u8()?,
        },
        6 => Message::Ready,
        7 => {
            let batch = r.u64()?;
            let count = r.u32()? as usize;
            // Each record takes at least 40 bytes: a count beyond that is corrupt, and must not
            // make us allocate for it.
            if count > payload.len() / 40 + 1 {
                return error(format!(
                    "a batch claims {count} flows in {} bytes",
                    payload.len()
                ));
            }
            let mut flows = Vec::with_capacity(count);
            for _ in 0..count {
                flows.push(decode_flow(&mut r)?);
            }
            Message::Flows { batch, flows }
        }
        8 => Message::Ack { batch: r.u64()? },
        9 => Message::Commit { batch: r.u64()? },
        10 => Message::Done { flows: r.u64()? },
        kind => return error(format!("unknown message kind {kind}")),
    };
    if !r.0.is_empty() {
        return error(format!(
            "{} bytes left over in a {}",
            r.0.len(),
            message.name()
        ));
    }
    if message.fd_count() != header.fds {
        return error(format!(
            "a {} needs {} descriptors, the frame says {}",
            message.name(),
            message.fd_count(),
            header.fds
        ));
    }
    Ok(message)
}

fn decode_flow(r: &mut Reader) -> Result<FlowState, ProtocolError> {
    let client_text = r.str()?;
    let client = client_text
        .parse()
        .or_else(|_| error(format!("bad client address '{client_text}'")))?;
    let backend = match r.u8()? {
        0 => None,
        1 => Some(r.str()?),
        b => return error(format!("bad backend marker {b}")),
    };
    let bytes = [r.u64()?, r.u64()?];
    let age = Duration::from_micros(r.u64()?);
    let idle = Duration::from_micros(r.u64()?);
    let connect_time = match r.u64()? {
        u64::MAX => None,
        us => Some(Duration::from_micros(us)),
    };
    let quiesced_at = r.u64()?;
    let mut pipes: [PipeState; 2] = Default::default();
    for pipe in &mut pipes {
        let flags = r.u8()?;
        pipe.eof = flags & 1 != 0;
        pipe.shutdown_done = flags & 2 != 0;
        let len = r.u32()? as usize;
        pipe.pending = r.take(len)?.to_vec();
    }
    Ok(FlowState {
        client,
        backend,
        bytes,
        age,
        idle,
        connect_time,
        pipes,
        quiesced_at,
    })
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes_raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, s: &str) {
        let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.u16(bytes.len() as u16);
        self.bytes_raw(bytes);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return error("a message ends early");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn str(&mut self) -> Result<String, ProtocolError> {
        let len = usize::from(self.u16()?);
        String::from_utf8(self.take(len)?.to_vec()).or_else(|_| error("a string is not UTF-8"))
    }
}

/// What a successor does with the old process's `Hello`: speak its version, or say it cannot.
pub fn answer_hello(version: u16) -> Message {
    if version == VERSION {
        Message::Speak { version }
    } else {
        Message::CannotRead { reads: VERSION }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: Message) {
        let frame = encode(&message);
        let header = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.len, frame.len() - HEADER_LEN);
        assert_eq!(decode(header, &frame[HEADER_LEN..]).unwrap(), message);
    }

    fn flow(backend: Option<&str>) -> FlowState {
        FlowState {
            client: "[2001:db8::7]:40000".parse().unwrap(),
            backend: backend.map(str::to_string),
            bytes: [12345, 1 << 40],
            age: Duration::from_micros(3_000_001),
            idle: Duration::from_millis(250),
            connect_time: Some(Duration::from_micros(812)),
            pipes: [
                PipeState {
                    eof: true,
                    shutdown_done: false,
                    pending: b"still to go".to_vec(),
                },
                PipeState {
                    eof: true,
                    shutdown_done: true,
                    pending: Vec::new(),
                },
            ],
            quiesced_at: 123_456_789,
        }
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Message::Hello { version: VERSION });
        round_trip(Message::Refused {
            reason: "peer uid 65534 is not 0".into(),
        });
        round_trip(Message::Speak { version: 1 });
        round_trip(Message::CannotRead { reads: 1 });
        round_trip(Message::Listeners {
            addr: "127.0.0.1:8080".into(),
            count: 4,
        });
        round_trip(Message::Ready);
        round_trip(Message::Flows {
            batch: 7,
            flows: vec![flow(Some("10.0.0.1:80")), flow(None)],
        });
        round_trip(Message::Ack { batch: 7 });
        round_trip(Message::Commit { batch: 7 });
        round_trip(Message::Done { flows: 2000 });
    }

    #[test]
    fn descriptors_are_counted_per_record() {
        let batch = Message::Flows {
            batch: 1,
            flows: vec![flow(Some("b:1")), flow(None), flow(Some("b:2"))],
        };
        assert_eq!(batch.fd_count(), 5);
        assert_eq!(encode(&batch)[5], 5);
    }

    #[test]
    fn a_frame_whose_descriptor_count_disagrees_is_rejected() {
        let mut frame = encode(&Message::Listeners {
            addr: "127.0.0.1:1".into(),
            count: 2,
        });
        frame[5] = 1;
        let header = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert!(decode(header, &frame[HEADER_LEN..]).is_err());
    }

    #[test]
    fn truncated_and_corrupt_frames_are_errors_not_panics() {
        let frame = encode(&Message::Flows {
            batch: 1,
            flows: vec![flow(Some("10.0.0.1:80"))],
        });
        let header = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        for cut in 0..frame.len() - HEADER_LEN {
            let short = Header { len: cut, ..header };
            assert!(decode(short, &frame[HEADER_LEN..HEADER_LEN + cut]).is_err());
        }
        let mut bad = frame.clone();
        bad[HEADER_LEN] = 0xff; // batch id is fine; corrupt the address length instead:
        bad[HEADER_LEN + 12] = 0xff;
        assert!(decode(header, &bad[HEADER_LEN..]).is_err());
        assert!(decode_header(&[0xff, 0xff, 0xff, 0x7f, 7, 0, 0, 0]).is_err());
    }

    #[test]
    fn a_hello_without_the_magic_is_not_a_ringway() {
        let mut frame = encode(&Message::Hello { version: 1 });
        frame[HEADER_LEN] = b'X';
        let header = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        let e = decode(header, &frame[HEADER_LEN..]).unwrap_err();
        assert!(e.0.contains("magic"), "{e}");
    }

    #[test]
    fn a_successor_answers_only_the_version_it_reads() {
        assert_eq!(answer_hello(VERSION), Message::Speak { version: VERSION });
        assert_eq!(
            answer_hello(VERSION + 1),
            Message::CannotRead { reads: VERSION }
        );
    }
}
