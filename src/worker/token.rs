//! io_uring user_data tokens: which flow slot, which generation of that slot, which operation.
//!
//! A slot is reused after its flow is released, so a token also carries the slot's generation:
//! a completion whose generation does not match the slot's current flow is stale and is dropped.

use crate::flow::Side;

/// What an operation was, so its completion can be routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Multishot accept on the worker's listener (not tied to a flow).
    Accept,
    /// Read on the worker's wake-up eventfd (not tied to a flow).
    Wake,
    /// The worker's periodic tick timeout (not tied to a flow).
    Tick,
    /// Cancel of the multishot accept (not tied to a flow).
    AcceptCancel,
    Connect,
    LinkTimeout,
    Recv(Side),
    /// A cancel of one of a flow's operations (closing, or taking a stalled send's buffer back).
    Cancel,
    Send(Side),
    Shutdown(Side),
    /// Read of the client's PROXY protocol header.
    HeaderRecv,
    /// Send of the preface (PROXY header, early client bytes) to the backend.
    Preface,
    /// Close of a released flow's socket (not tied to a flow; only failures complete).
    Close,
    /// The last close of a released flow's sockets (not tied to a flow): its descriptors are
    /// gone, so its share of `--max-conns` is free again.
    FlowClosed,
    /// Read on the worker's hand-off eventfd: another worker passed it connections (not tied
    /// to a flow; `handoff.rs`).
    HandedIn,
    /// Readiness of a splicing direction: POLLIN on its source socket.
    PollIn(Side),
    /// POLLOUT on a splicing direction's destination socket.
    PollOut(Side),
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Accept => 1,
            Kind::Wake => 2,
            Kind::Tick => 3,
            Kind::AcceptCancel => 4,
            Kind::Connect => 5,
            Kind::LinkTimeout => 6,
            Kind::Recv(Side::Client) => 7,
            Kind::Recv(Side::Backend) => 8,
            Kind::Cancel => 9,
            Kind::Send(Side::Client) => 10,
            Kind::Send(Side::Backend) => 11,
            Kind::Shutdown(Side::Client) => 12,
            Kind::Shutdown(Side::Backend) => 13,
            Kind::HeaderRecv => 14,
            Kind::Preface => 15,
            Kind::Close => 16,
            Kind::FlowClosed => 17,
            Kind::HandedIn => 18,
            Kind::PollIn(Side::Client) => 19,
            Kind::PollIn(Side::Backend) => 20,
            Kind::PollOut(Side::Client) => 21,
            Kind::PollOut(Side::Backend) => 22,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Accept,
            2 => Kind::Wake,
            3 => Kind::Tick,
            4 => Kind::AcceptCancel,
            5 => Kind::Connect,
            6 => Kind::LinkTimeout,
            7 => Kind::Recv(Side::Client),
            8 => Kind::Recv(Side::Backend),
            9 => Kind::Cancel,
            10 => Kind::Send(Side::Client),
            11 => Kind::Send(Side::Backend),
            12 => Kind::Shutdown(Side::Client),
            13 => Kind::Shutdown(Side::Backend),
            14 => Kind::HeaderRecv,
            15 => Kind::Preface,
            16 => Kind::Close,
            17 => Kind::FlowClosed,
            18 => Kind::HandedIn,
            19 => Kind::PollIn(Side::Client),
            20 => Kind::PollIn(Side::Backend),
            21 => Kind::PollOut(Side::Client),
            22 => Kind::PollOut(Side::Backend),
            _ => return None,
        })
    }
}

/// Generations wrap at 24 bits: a stale completion would need 16M reuses of one slot while it
/// was in flight to be mistaken for a live one.
pub const GENERATION_MASK: u32 = 0x00ff_ffff;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub slot: u32,
    pub generation: u32,
    pub kind: Kind,
}

impl Token {
    pub fn new(slot: usize, generation: u32, kind: Kind) -> Token {
        Token {
            slot: slot as u32,
            generation: generation & GENERATION_MASK,
            kind,
        }
    }

    /// A token for worker-level operations that belong to no flow.
    pub fn worker(kind: Kind) -> Token {
        Token::new(0, 0, kind)
    }

    pub fn encode(self) -> u64 {
        (u64::from(self.slot) << 32)
            | (u64::from(self.generation) << 8)
            | u64::from(self.kind.code())
    }

    pub fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            slot: (user_data >> 32) as u32,
            generation: ((user_data >> 8) as u32) & GENERATION_MASK,
            kind: Kind::from_code(user_data as u8)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        for code in 1..=22u8 {
            let kind = Kind::from_code(code).unwrap();
            assert_eq!(kind.code(), code);
            let token = Token::new(123_456, 0xabcdef, kind);
            assert_eq!(Token::decode(token.encode()), Some(token));
        }
    }

    #[test]
    fn generation_wraps_into_24_bits() {
        let token = Token::new(1, 0x1ff_ffff, Kind::Connect);
        assert_eq!(Token::decode(token.encode()).unwrap().generation, 0xff_ffff);
    }

    #[test]
    fn unknown_kind_is_rejected() {
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(200), None);
    }
}
