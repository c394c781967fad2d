//! Bytes on the wire and how replies are checked.
//!
//! Streams (bulk, `source` backend) carry a fixed pseudo-random pattern whose period is a
//! prime (65521), so a dropped, duplicated or reordered chunk shows up as a mismatch at a
//! known offset. Request/response messages carry their sequence number in the first 8 bytes
//! (little endian) followed by pattern bytes, so a reply to an older request, a short reply or
//! a long one is caught.

use std::sync::OnceLock;

/// Period of the stream pattern (prime).
pub const PATTERN_PERIOD: usize = 65_521;
/// Largest window [`window`] returns.
pub const MAX_WINDOW: usize = 64 * 1024;

fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        // xorshift64; the first MAX_WINDOW bytes are repeated at the end so that any window
        // of up to MAX_WINDOW bytes is one contiguous slice.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v: Vec<u8> = (0..PATTERN_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for i in PATTERN_PERIOD..PATTERN_PERIOD + MAX_WINDOW {
            let b = v[i - PATTERN_PERIOD];
            v.push(b);
        }
        v
    })
}

/// The `len` stream bytes starting at stream offset `offset` (len <= MAX_WINDOW).
pub fn window(offset: u64, len: usize) -> &'static [u8] {
    let len = len.min(MAX_WINDOW);
    let start = (offset % PATTERN_PERIOD as u64) as usize;
    &pattern()[start..start + len]
}

/// Check that `data` is the stream content at `offset`. Returns the index of the first bad
/// byte within `data`.
pub fn check_stream(offset: u64, data: &[u8]) -> Result<(), usize> {
    let mut done = 0;
    while done < data.len() {
        let n = (data.len() - done).min(MAX_WINDOW);
        let want = window(offset + done as u64, n);
        let got = &data[done..done + n];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(done + at);
        }
        done += n;
    }
    Ok(())
}

/// Fill `buf` with request number `seq` of `size` bytes.
pub fn make_request(seq: u64, size: usize, buf: &mut Vec<u8>) {
    buf.clear();
    let seq_bytes = seq.to_le_bytes();
    let head = size.min(8);
    buf.extend_from_slice(&seq_bytes[..head]);
    let mut off = 8u64;
    while buf.len() < size {
        let n = (size - buf.len()).min(MAX_WINDOW);
        buf.extend_from_slice(window(off, n));
        off += n as u64;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// Reply longer or shorter than the request.
    Length { got: usize, want: usize },
    /// Reply carries another request's sequence number.
    Sequence,
    /// Payload differs at this byte.
    Content { at: usize },
}

impl ReplyError {
    /// Short name used in error counters.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplyError::Length { .. } => "reply_length",
            ReplyError::Sequence => "reply_sequence",
            ReplyError::Content { .. } => "reply_content",
        }
    }
}

/// Check an echo reply for request `seq` of `size` bytes.
pub fn check_reply(seq: u64, size: usize, reply: &[u8]) -> Result<(), ReplyError> {
    if reply.len() != size {
        return Err(ReplyError::Length {
            got: reply.len(),
            want: size,
        });
    }
    let head = size.min(8);
    if reply[..head] != seq.to_le_bytes()[..head] {
        return Err(ReplyError::Sequence);
    }
    if size > 8 {
        check_stream(8, &reply[8..]).map_err(|at| ReplyError::Content { at: at + 8 })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_wraps_around_the_period() {
        let a = window(PATTERN_PERIOD as u64 - 3, 10).to_vec();
        let b = window(PATTERN_PERIOD as u64 * 5 - 3, 10).to_vec();
        assert_eq!(a, b);
        assert_eq!(&a[3..], window(0, 7));
        assert_eq!(window(0, MAX_WINDOW * 2).len(), MAX_WINDOW);
    }

    #[test]
    fn stream_check_finds_first_bad_byte() {
        let mut data = Vec::new();
        let mut off = 1000u64;
        while data.len() < 200_000 {
            data.extend_from_slice(window(off, 4096));
            off += 4096;
        }
        assert_eq!(check_stream(1000, &data), Ok(()));
        assert!(check_stream(1001, &data).is_err());
        data[150_000] ^= 1;
        assert_eq!(check_stream(1000, &data), Err(150_000));
    }

    #[test]
    fn pattern_is_not_trivial() {
        let w = window(0, 4096);
        let distinct: std::collections::HashSet<u8> = w.iter().copied().collect();
        assert!(distinct.len() > 200);
    }

    #[test]
    fn replies_are_checked() {
        let mut req = Vec::new();
        make_request(42, 64, &mut req);
        assert_eq!(req.len(), 64);
        assert_eq!(check_reply(42, 64, &req), Ok(()));
        assert_eq!(check_reply(41, 64, &req), Err(ReplyError::Sequence));
        assert_eq!(
            check_reply(42, 64, &req[..63]),
            Err(ReplyError::Length { got: 63, want: 64 })
        );
        let mut bad = req.clone();
        bad[40] ^= 0xff;
        assert_eq!(
            check_reply(42, 64, &bad),
            Err(ReplyError::Content { at: 40 })
        );
        assert_eq!(ReplyError::Content { at: 40 }.kind(), "reply_content");
    }

    #[test]
    fn tiny_and_large_requests() {
        let mut req = Vec::new();
        make_request(0x0102_0304, 3, &mut req);
        assert_eq!(req, vec![4, 3, 2]);
        assert_eq!(check_reply(0x0102_0304, 3, &req), Ok(()));
        make_request(7, 200_000, &mut req);
        assert_eq!(req.len(), 200_000);
        assert_eq!(check_reply(7, 200_000, &req), Ok(()));
    }
}
