//! PROXY protocol headers (HAProxy's "proxy-protocol.txt"): version 1 (one text line) and
//! version 2 (binary). Pure code: no I/O, and parsing never allocates.
//!
//! Ringway uses them in both directions:
//! - towards backends it *encodes* a header before the first client byte, so the backend learns
//!   the real client address ([`encode_v1`], [`encode_v2`], and [`encode_v2_local`] for health
//!   checks, which carry no client);
//! - from a trusted upstream load balancer it *parses* the header that precedes the client's
//!   bytes ([`parse`]). The parser is incremental: call it on everything received so far; it
//!   answers [`Parsed::Incomplete`] until the header is whole, and rejects bytes that cannot be
//!   a PROXY header as early as possible, so a client that speaks something else is turned away
//!   without waiting for a timeout.
//!
//! Mixed families (an IPv4 client reaching an IPv6 listener or the reverse) cannot be written as
//! TCP4 or AF_INET, so the encoders write both addresses as IPv6, the IPv4 one mapped
//! (`::ffff:a.b.c.d`): v1 says `TCP6`, v2 says AF_INET6. The parser returns addresses as sent;
//! it does not turn mapped addresses back into IPv4 (the access list treats both alike).

use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with. They contain a NUL and "QUIT", so no text protocol
/// (and no v1 header) can start with them.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Every v1 header starts with these 6 bytes.
const V1_PREFIX: &[u8] = b"PROXY ";

/// The longest v1 line the spec allows, CRLF included: "PROXY TCP6" with two full-length IPv6
/// addresses and two 5-digit ports is 104 bytes; the spec rounds up to 107.
pub const V1_MAX_LEN: usize = 107;

/// The shortest v1 header: `PROXY UNKNOWN\r\n`.
pub const V1_MIN_LEN: usize = 15;

/// Signature, version/command, family/transport and the 2-byte length.
const V2_FIXED_LEN: usize = 16;

/// The longest v2 header this parser accepts, fixed part and TLVs included. The spec allows
/// 16 + 65535 bytes, but real senders add at most a few hundred bytes of TLVs (AWS, GCP and
/// Azure all stay far below this); refusing longer ones keeps a connection that is still waiting
/// for its header from pinning a large buffer.
pub const V2_MAX_HEADER_LEN: usize = 4096;

/// Version 2 in the high nibble of byte 13.
const V2_VERSION: u8 = 0x20;
const V2_COMMAND_LOCAL: u8 = 0x0;
const V2_COMMAND_PROXY: u8 = 0x1;

/// Byte 14: address family in the high nibble, transport in the low one.
const V2_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_UDP4: u8 = 0x12;
const V2_TCP6: u8 = 0x21;
const V2_UDP6: u8 = 0x22;
const V2_UNIX_STREAM: u8 = 0x31;
const V2_UNIX_DGRAM: u8 = 0x32;

/// Address block sizes: two addresses and, for IP, two ports.
const V2_INET_LEN: usize = 4 + 4 + 2 + 2;
const V2_INET6_LEN: usize = 16 + 16 + 2 + 2;
const V2_UNIX_LEN: usize = 108 + 108;

/// Writes a v1 header for a TCP connection from `src` to `dst`, e.g.
/// `PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n`. If only one of them is IPv4, both are
/// written as IPv6 under `TCP6`, the IPv4 one mapped (`::ffff:192.0.2.1`).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    let (protocol, src_ip, dst_ip) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ("TCP4", IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => ("TCP6", IpAddr::V6(as_ipv6(s)), IpAddr::V6(as_ipv6(d))),
    };
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "PROXY {protocol} {src_ip} {dst_ip} {} {}\r\n",
        src.port(),
        dst.port()
    );
}

/// Writes a v2 PROXY header (TCP, no TLVs) for a connection from `src` to `dst`: 28 bytes for
/// IPv4, 52 for IPv6. If only one of them is IPv4, both are written as AF_INET6, the IPv4 one
/// mapped.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION | V2_COMMAND_PROXY);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(V2_TCP4);
            out.extend_from_slice(&(V2_INET_LEN as u16).to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(V2_TCP6);
            out.extend_from_slice(&(V2_INET6_LEN as u16).to_be_bytes());
            out.extend_from_slice(&as_ipv6(s).octets());
            out.extend_from_slice(&as_ipv6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

/// Writes a v2 LOCAL header (16 bytes, no addresses): the connection is Ringway's own, e.g. a
/// health check, and the backend should use the real endpoints.
pub fn encode_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION | V2_COMMAND_LOCAL);
    out.push(V2_UNSPEC);
    out.extend_from_slice(&0u16.to_be_bytes());
}

fn as_ipv6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// What [`parse`] found in the bytes received so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Everything so far is a valid start of a header; read more.
    Incomplete {
        /// The header is at least this many bytes long in total, so parsing cannot progress
        /// before the buffer holds that many. Exact for v2 once its 16-byte fixed part has
        /// arrived, and for v1 once the final CR has.
        min_header_len: usize,
    },
    /// A whole header. The client's own bytes start at `buf[header_len..]`.
    Complete {
        header_len: usize,
        /// `None` for v1 `UNKNOWN`, v2 `LOCAL`, and v2 AF_UNSPEC or AF_UNIX: use the real
        /// connection's addresses then.
        source: Option<SocketAddr>,
        destination: Option<SocketAddr>,
        /// 1 or 2.
        version: u8,
    },
}

/// Why bytes are not a valid PROXY header. Once [`parse`] returns an error, more bytes will not
/// fix it: close the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The first bytes match neither the v1 `PROXY ` prefix nor the v2 signature.
    NotProxy,
    /// v1: no CRLF within [`V1_MAX_LEN`] bytes.
    V1TooLong,
    /// v1: a CR not followed by LF, or an LF without a CR before it.
    V1BadLineEnding,
    /// v1: the protocol is not `TCP4`, `TCP6` or `UNKNOWN`.
    V1BadProtocol,
    /// v1: not exactly `PROXY TCPn SRC DST SPORT DPORT`, single spaces, or characters that
    /// cannot appear in addresses and ports.
    V1BadSyntax,
    /// v1: an address that is not IPv4 (for `TCP4`) or IPv6 (for `TCP6`) in standard notation.
    V1BadAddress,
    /// v1: a port that is not 1 to 5 decimal digits with a value up to 65535.
    V1BadPort,
    /// v2: the version nibble is not 2.
    V2BadVersion,
    /// v2: the command is neither LOCAL nor PROXY.
    V2BadCommand,
    /// v2: an address family / transport byte the spec does not define.
    V2BadFamily,
    /// v2: the length field makes the header longer than [`V2_MAX_HEADER_LEN`].
    V2TooLong,
    /// v2: the length field is too short for the addresses of the announced family.
    V2AddressesTruncated,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ParseError::NotProxy => "not a PROXY protocol header",
            ParseError::V1TooLong => "PROXY v1 line longer than 107 bytes",
            ParseError::V1BadLineEnding => "PROXY v1 line does not end with CRLF",
            ParseError::V1BadProtocol => "PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ParseError::V1BadSyntax => "PROXY v1 line is not 'PROXY TCPn SRC DST SPORT DPORT'",
            ParseError::V1BadAddress => "PROXY v1 address is invalid for its protocol",
            ParseError::V1BadPort => "PROXY v1 port is not a number from 0 to 65535",
            ParseError::V2BadVersion => "PROXY v2 header has a version other than 2",
            ParseError::V2BadCommand => "PROXY v2 command is neither LOCAL nor PROXY",
            ParseError::V2BadFamily => "PROXY v2 address family or transport is undefined",
            ParseError::V2TooLong => "PROXY v2 header longer than 4096 bytes",
            ParseError::V2AddressesTruncated => "PROXY v2 length too short for its addresses",
        };
        f.write_str(text)
    }
}

impl std::error::Error for ParseError {}

/// Parses a PROXY header (v1 or v2, told apart by the first byte) at the start of `buf`, the
/// bytes received so far. Never reads past the header: trailing bytes are the client's.
pub fn parse(buf: &[u8]) -> Result<Parsed, ParseError> {
    match buf.first() {
        // Nothing yet: the smallest header of either version is a v1 UNKNOWN line.
        None => Ok(Parsed::Incomplete {
            min_header_len: V1_MIN_LEN,
        }),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ParseError::NotProxy),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ParseError> {
    if !starts_like(buf, V1_PREFIX) {
        return Err(ParseError::NotProxy);
    }
    let rest = buf.get(V1_PREFIX.len()..).unwrap_or_default();
    // The header is one line; it ends at the first CR, which must be followed by LF.
    let window = &rest[..rest.len().min(V1_MAX_LEN - V1_PREFIX.len())];
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ParseError::V1TooLong);
        }
        check_v1_partial_line(rest)?;
        return Ok(Parsed::Incomplete {
            min_header_len: V1_MIN_LEN.max(buf.len() + 1),
        });
    };
    let header_len = V1_PREFIX.len() + end + 2;
    if rest[end] == b'\n' {
        return Err(ParseError::V1BadLineEnding);
    }
    if header_len > V1_MAX_LEN {
        return Err(ParseError::V1TooLong);
    }
    let line = &rest[..end];
    match rest.get(end + 1) {
        // Only the LF is missing: the line is whole, so judge it now.
        None => {
            parse_v1_line(line)?;
            Ok(Parsed::Incomplete {
                min_header_len: header_len,
            })
        }
        Some(b'\n') => {
            let (source, destination) = parse_v1_line(line)?;
            Ok(Parsed::Complete {
                header_len,
                source,
                destination,
                version: 1,
            })
        }
        Some(_) => Err(ParseError::V1BadLineEnding),
    }
}

/// Rejects an unfinished v1 line (after `PROXY `) that no ending could make valid. It must
/// accept every prefix of a valid line, and reject only what [`parse_v1_line`] would reject too.
fn check_v1_partial_line(partial: &[u8]) -> Result<(), ParseError> {
    if let Some(after) = partial.strip_prefix(b"UNKNOWN") {
        // Anything may follow "UNKNOWN " before the CRLF; the receiver ignores it.
        return match after.first() {
            None | Some(b' ') => Ok(()),
            Some(_) => Err(ParseError::V1BadProtocol),
        };
    }
    if let Some(fields) = partial
        .strip_prefix(b"TCP4 ")
        .or_else(|| partial.strip_prefix(b"TCP6 "))
    {
        let allowed = |b: &u8| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b' ');
        let spaces = fields.iter().filter(|&&b| b == b' ').count();
        return if fields.iter().all(allowed) && spaces <= 3 {
            Ok(())
        } else {
            Err(ParseError::V1BadSyntax)
        };
    }
    // Too short to name the protocol yet: it must still be on the way to one.
    let protocols: [&[u8]; 3] = [b"TCP4 ", b"TCP6 ", b"UNKNOWN"];
    if protocols.iter().any(|p| p.starts_with(partial)) {
        Ok(())
    } else {
        Err(ParseError::V1BadProtocol)
    }
}

/// Parses a whole v1 line after `PROXY `, without its CRLF, into (source, destination).
fn parse_v1_line(line: &[u8]) -> Result<(Option<SocketAddr>, Option<SocketAddr>), ParseError> {
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return Ok((None, None));
    }
    let mut fields = line.split(|&b| b == b' ');
    let ipv6 = match fields.next() {
        Some(b"TCP4") => false,
        Some(b"TCP6") => true,
        _ => return Err(ParseError::V1BadProtocol),
    };
    let (Some(src), Some(dst), Some(src_port), Some(dst_port), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ParseError::V1BadSyntax);
    };
    let source = SocketAddr::new(parse_v1_ip(src, ipv6)?, parse_v1_port(src_port)?);
    let destination = SocketAddr::new(parse_v1_ip(dst, ipv6)?, parse_v1_port(dst_port)?);
    Ok((Some(source), Some(destination)))
}

fn parse_v1_ip(text: &[u8], ipv6: bool) -> Result<IpAddr, ParseError> {
    let text = std::str::from_utf8(text).map_err(|_| ParseError::V1BadAddress)?;
    let ip = if ipv6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map_err(|_| ParseError::V1BadAddress)
}

/// Digits only: `str::parse` would also take a leading `+`. Leading zeros are accepted; the spec
/// does not forbid them.
fn parse_v1_port(text: &[u8]) -> Result<u16, ParseError> {
    if text.is_empty() || text.len() > 5 || !text.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::V1BadPort);
    }
    let value = text
        .iter()
        .fold(0u32, |n, &digit| n * 10 + u32::from(digit - b'0'));
    u16::try_from(value).map_err(|_| ParseError::V1BadPort)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ParseError> {
    if !starts_like(buf, &V2_SIGNATURE) {
        return Err(ParseError::NotProxy);
    }
    // Check each fixed byte as soon as it arrives, so garbage is refused early.
    let command = match buf.get(12) {
        None => None,
        Some(&version_command) if version_command & 0xf0 != V2_VERSION => {
            return Err(ParseError::V2BadVersion)
        }
        Some(&version_command) => match version_command & 0x0f {
            V2_COMMAND_LOCAL => Some(V2_COMMAND_LOCAL),
            V2_COMMAND_PROXY => Some(V2_COMMAND_PROXY),
            _ => return Err(ParseError::V2BadCommand),
        },
    };
    let local = command == Some(V2_COMMAND_LOCAL);
    // LOCAL headers carry no meaningful addresses, so their family byte is not checked.
    let address_len = match buf.get(13) {
        Some(&family) if !local => Some(v2_address_len(family).ok_or(ParseError::V2BadFamily)?),
        _ => None,
    };
    let Some(&[len_high, len_low]) = buf.get(14..V2_FIXED_LEN) else {
        return Ok(Parsed::Incomplete {
            min_header_len: V2_FIXED_LEN,
        });
    };
    let body_len = usize::from(u16::from_be_bytes([len_high, len_low]));
    let header_len = V2_FIXED_LEN + body_len;
    if header_len > V2_MAX_HEADER_LEN {
        return Err(ParseError::V2TooLong);
    }
    if body_len < address_len.unwrap_or(0) {
        return Err(ParseError::V2AddressesTruncated);
    }
    // The body is the address block, then TLVs, which Ringway has no use for: the length field
    // already says where the header ends, so they are skipped unread.
    let Some(body) = buf.get(V2_FIXED_LEN..header_len) else {
        return Ok(Parsed::Incomplete {
            min_header_len: header_len,
        });
    };
    let addresses = match buf.get(13) {
        Some(&family) if !local => v2_addresses(family, body)?,
        _ => None,
    };
    Ok(Parsed::Complete {
        header_len,
        source: addresses.map(|(source, _)| source),
        destination: addresses.map(|(_, destination)| destination),
        version: 2,
    })
}

/// The size of the address block for a family / transport byte; `None` for the values the spec
/// says receivers must reject.
fn v2_address_len(family: u8) -> Option<usize> {
    match family {
        V2_UNSPEC => Some(0),
        V2_TCP4 | V2_UDP4 => Some(V2_INET_LEN),
        V2_TCP6 | V2_UDP6 => Some(V2_INET6_LEN),
        V2_UNIX_STREAM | V2_UNIX_DGRAM => Some(V2_UNIX_LEN),
        _ => None,
    }
}

/// The (source, destination) of a PROXY command's body; `None` for families without IP
/// addresses. UDP families are decoded too: the addresses are still the client's.
fn v2_addresses(family: u8, body: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, ParseError> {
    let truncated = ParseError::V2AddressesTruncated;
    match family {
        V2_TCP4 | V2_UDP4 => {
            let (src, rest) = body.split_first_chunk::<4>().ok_or(truncated)?;
            let (dst, rest) = rest.split_first_chunk::<4>().ok_or(truncated)?;
            let (src_ip, dst_ip) = (Ipv4Addr::from(*src), Ipv4Addr::from(*dst));
            let (src_port, dst_port) = v2_ports(rest)?;
            Ok(Some((
                SocketAddr::new(src_ip.into(), src_port),
                SocketAddr::new(dst_ip.into(), dst_port),
            )))
        }
        V2_TCP6 | V2_UDP6 => {
            let (src, rest) = body.split_first_chunk::<16>().ok_or(truncated)?;
            let (dst, rest) = rest.split_first_chunk::<16>().ok_or(truncated)?;
            let (src_ip, dst_ip) = (Ipv6Addr::from(*src), Ipv6Addr::from(*dst));
            let (src_port, dst_port) = v2_ports(rest)?;
            Ok(Some((
                SocketAddr::new(src_ip.into(), src_port),
                SocketAddr::new(dst_ip.into(), dst_port),
            )))
        }
        _ => Ok(None),
    }
}

fn v2_ports(block: &[u8]) -> Result<(u16, u16), ParseError> {
    match block {
        [s1, s2, d1, d2, ..] => Ok((
            u16::from_be_bytes([*s1, *s2]),
            u16::from_be_bytes([*d1, *d2]),
        )),
        _ => Err(ParseError::V2AddressesTruncated),
    }
}

/// Whether `buf` and `expected` agree on their common length: `buf` is a prefix of `expected`,
/// or starts with all of it.
fn starts_like(buf: &[u8], expected: &[u8]) -> bool {
    let common = buf.len().min(expected.len());
    buf[..common] == expected[..common]
}

/// Checks what must hold for any input, panicking when something does not: for the fuzz target
/// (fuzz/fuzz_targets/proxy_protocol.rs) and the unit tests, which share it so they cannot drift.
///
/// - `parse` never panics;
/// - a complete header fits in the input, and the header alone parses to the same result;
/// - every shorter prefix of an input that is not an error is `Incomplete`, with a
///   `min_header_len` longer than the prefix and no longer than the eventual header; longer
///   prefixes give the same complete result (so an error never turns into success with more
///   bytes, and a success never depends on bytes past the header).
#[doc(hidden)]
pub fn assert_parse_invariants(input: &[u8]) {
    let result = parse(input);
    let header_len = match result {
        Err(_) => return,
        Ok(Parsed::Incomplete { min_header_len }) => {
            assert!(min_header_len > input.len(), "{result:?} for {input:?}");
            None
        }
        Ok(Parsed::Complete { header_len, .. }) => {
            assert!(header_len <= input.len(), "{result:?} for {input:?}");
            assert!(header_len >= V1_MIN_LEN, "{result:?} for {input:?}");
            assert_eq!(
                parse(&input[..header_len]),
                result,
                "header alone: {input:?}"
            );
            Some(header_len)
        }
    };
    for len in 0..input.len() {
        let prefix = parse(&input[..len]);
        match (header_len, prefix) {
            (Some(header_len), _) if len >= header_len => {
                assert_eq!(prefix, result, "prefix {len} of {input:?}")
            }
            (_, Ok(Parsed::Incomplete { min_header_len })) => {
                assert!(min_header_len > len, "prefix {len} of {input:?}");
                let eventual = header_len.unwrap_or(usize::MAX);
                assert!(min_header_len <= eventual, "prefix {len} of {input:?}");
            }
            _ => panic!("prefix {len} of {input:?} gave {prefix:?}, the whole {result:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn complete(
        header_len: usize,
        source: &str,
        destination: &str,
        version: u8,
    ) -> Result<Parsed, ParseError> {
        Ok(Parsed::Complete {
            header_len,
            source: Some(addr(source)),
            destination: Some(addr(destination)),
            version,
        })
    }

    fn no_addresses(header_len: usize, version: u8) -> Result<Parsed, ParseError> {
        Ok(Parsed::Complete {
            header_len,
            source: None,
            destination: None,
            version,
        })
    }

    fn v2(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Deterministic pseudo-random numbers (xorshift64), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn socket_addr(&mut self) -> SocketAddr {
            let port = self.next() as u16;
            match self.below(3) {
                0 => SocketAddr::new(Ipv4Addr::from(self.next() as u32).into(), port),
                // Short runs of zero groups exercise "::" compression in v1 text.
                1 => {
                    let mut groups = [0u16; 8];
                    for group in groups.iter_mut() {
                        if self.below(2) == 0 {
                            *group = self.next() as u16;
                        }
                    }
                    SocketAddr::new(Ipv6Addr::from(groups).into(), port)
                }
                _ => {
                    let bits = (u128::from(self.next()) << 64) | u128::from(self.next());
                    SocketAddr::new(Ipv6Addr::from(bits).into(), port)
                }
            }
        }
    }

    // ---- v1 ----

    #[test]
    fn v1_tcp4() {
        let header = b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n";
        let expected = complete(header.len(), "192.0.2.1:51234", "198.51.100.2:443", 1);
        assert_eq!(parse(header), expected);
    }

    #[test]
    fn v1_tcp6() {
        let header = b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 0 65535\r\n";
        let expected = complete(
            header.len(),
            "[2001:db8::1]:0",
            "[::ffff:10.0.0.1]:65535",
            1,
        );
        assert_eq!(parse(header), expected);
    }

    #[test]
    fn v1_spec_worst_cases_fit() {
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(tcp4.len(), 56);
        let expected = complete(56, "255.255.255.255:65535", "255.255.255.255:65535", 1);
        assert_eq!(parse(tcp4), expected);

        let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        let socket = format!("[{full}]:65535");
        assert_eq!(parse(tcp6.as_bytes()), complete(104, &socket, &socket, 1));
    }

    #[test]
    fn v1_unknown_ignores_the_rest_of_the_line() {
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), no_addresses(15, 1));
        let line = b"PROXY UNKNOWN ffff:: whatever 1 2\r\n";
        assert_eq!(parse(line), no_addresses(line.len(), 1));
    }

    #[test]
    fn v1_line_of_exactly_107_bytes_is_accepted_and_108_is_not() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line), no_addresses(V1_MAX_LEN, 1));

        line.insert(20, b'x');
        assert_eq!(parse(&line), Err(ParseError::V1TooLong));
        // Known as soon as the CR lands one byte too late, and with no CR at all by byte 107.
        assert_eq!(parse(&line[..107]), Err(ParseError::V1TooLong));
        assert_eq!(
            parse(&line[..106]),
            Ok(Parsed::Incomplete {
                min_header_len: 107
            })
        );
    }

    #[test]
    fn v1_trailing_payload_is_not_consumed() {
        let input = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n";
        let expected = complete(32, "1.2.3.4:1", "5.6.7.8:2", 1);
        assert_eq!(parse(input), expected);
        assert_eq!(&input[32..35], b"GET");
    }

    #[test]
    fn v1_malformed_lines() {
        let cases: &[(&[u8], ParseError)] = &[
            (
                b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
                ParseError::V1BadProtocol,
            ),
            (
                b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
                ParseError::V1BadProtocol,
            ),
            (b"PROXY UNKNOWNX\r\n", ParseError::V1BadProtocol),
            (b"PROXY \r\n", ParseError::V1BadProtocol),
            (b"PROXY TCP4\r\n", ParseError::V1BadSyntax),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", ParseError::V1BadSyntax),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                ParseError::V1BadSyntax,
            ),
            (
                b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
                ParseError::V1BadSyntax,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
                ParseError::V1BadSyntax,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
                ParseError::V1BadPort,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\tx\r\n",
                ParseError::V1BadPort,
            ),
            (
                b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
                ParseError::V1BadAddress,
            ),
            (
                b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
                ParseError::V1BadAddress,
            ),
            (
                b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
                ParseError::V1BadAddress,
            ),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", ParseError::V1BadAddress),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", ParseError::V1BadAddress),
            (b"PROXY TCP6 ::1 ::1::2 1 2\r\n", ParseError::V1BadAddress),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
                ParseError::V1BadPort,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n",
                ParseError::V1BadPort,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 ab\r\n",
                ParseError::V1BadPort,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1.5 2\r\n",
                ParseError::V1BadPort,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
                ParseError::V1BadLineEnding,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
                ParseError::V1BadLineEnding,
            ),
            (b"PROXY UNKNOWN\n", ParseError::V1BadLineEnding),
            (b"PROXY UNKNOWN x\ry\r\n", ParseError::V1BadLineEnding),
        ];
        for (input, error) in cases {
            let text = String::from_utf8_lossy(input);
            assert_eq!(parse(input), Err(*error), "{text:?}");
        }
    }

    #[test]
    fn v1_ports_take_leading_zeros_but_not_signs() {
        let header = b"PROXY TCP4 1.2.3.4 5.6.7.8 00080 0\r\n";
        assert_eq!(
            parse(header),
            complete(header.len(), "1.2.3.4:80", "5.6.7.8:0", 1)
        );
        let signed = b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 0\r\n";
        assert_eq!(parse(signed), Err(ParseError::V1BadPort));
        assert_eq!(parse_v1_port(b"+80"), Err(ParseError::V1BadPort));
        assert_eq!(parse_v1_port(b""), Err(ParseError::V1BadPort));
    }

    #[test]
    fn v1_garbage_is_rejected_before_the_line_ends() {
        assert_eq!(parse(b"PROXY TCP5"), Err(ParseError::V1BadProtocol));
        assert_eq!(parse(b"PROXY UNKNOWNX"), Err(ParseError::V1BadProtocol));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 x"), Err(ParseError::V1BadSyntax));
        assert_eq!(parse(b"PROXY TCP4 1 2 3 4 5"), Err(ParseError::V1BadSyntax));
        assert_eq!(parse(b"PROXY TCP4\n"), Err(ParseError::V1BadLineEnding));
    }

    // ---- v2 ----

    #[test]
    fn v2_proxy_ipv4_known_bytes() {
        let header = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54,
            0x0a, // signature
            0x21, // version 2, PROXY
            0x11, // AF_INET, STREAM
            0x00, 0x0c, // 12 bytes of addresses
            192, 0, 2, 1, // source
            198, 51, 100, 2, // destination
            0xc8, 0x22, // source port 51234
            0x01, 0xbb, // destination port 443
        ];
        let expected = complete(28, "192.0.2.1:51234", "198.51.100.2:443", 2);
        assert_eq!(parse(&header), expected);
    }

    #[test]
    fn v2_proxy_ipv6() {
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&[0x12, 0x34, 0x00, 0x50]);
        let header = v2(0x21, 0x21, &body);
        assert_eq!(header.len(), 52);
        let expected = complete(52, "[2001:db8::1]:4660", "[2001:db8::2]:80", 2);
        assert_eq!(parse(&header), expected);
    }

    #[test]
    fn v2_udp_addresses_are_decoded_too() {
        let body = [10, 0, 0, 1, 10, 0, 0, 2, 0, 53, 0, 54];
        let expected = complete(28, "10.0.0.1:53", "10.0.0.2:54", 2);
        assert_eq!(parse(&v2(0x21, 0x12, &body)), expected);
    }

    #[test]
    fn v2_local_has_no_addresses_whatever_its_family() {
        assert_eq!(parse(&v2(0x20, 0x00, &[])), no_addresses(16, 2));
        let body = [10, 0, 0, 1, 10, 0, 0, 2, 0, 53, 0, 54];
        assert_eq!(parse(&v2(0x20, 0x11, &body)), no_addresses(28, 2));
        // The spec says LOCAL addresses are to be ignored, so their family is not judged.
        assert_eq!(parse(&v2(0x20, 0xff, &[])), no_addresses(16, 2));
    }

    #[test]
    fn v2_unspec_and_unix_have_no_addresses() {
        assert_eq!(parse(&v2(0x21, 0x00, &[])), no_addresses(16, 2));
        assert_eq!(parse(&v2(0x21, 0x31, &[b'/'; 216])), no_addresses(232, 2));
        assert_eq!(parse(&v2(0x21, 0x32, &[0; 216])), no_addresses(232, 2));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut body = vec![1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 0, 10];
        // PP2_TYPE_AUTHORITY "example.com", then PP2_TYPE_NOOP padding.
        body.extend_from_slice(&[0x02, 0x00, 0x0b]);
        body.extend_from_slice(b"example.com");
        body.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]);
        let mut input = v2(0x21, 0x11, &body);
        let header_len = input.len();
        input.extend_from_slice(b"client bytes");
        let expected = complete(header_len, "1.2.3.4:9", "5.6.7.8:10", 2);
        assert_eq!(parse(&input), expected);
    }

    #[test]
    fn v2_largest_accepted_header() {
        let body = vec![0; V2_MAX_HEADER_LEN - V2_FIXED_LEN];
        assert_eq!(
            parse(&v2(0x21, 0x00, &body)),
            no_addresses(V2_MAX_HEADER_LEN, 2)
        );
    }

    #[test]
    fn v2_malformed_headers() {
        let inet = [1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 0, 10];
        let cases: &[(Vec<u8>, ParseError)] = &[
            (v2(0x11, 0x11, &inet), ParseError::V2BadVersion),
            (v2(0x31, 0x11, &inet), ParseError::V2BadVersion),
            (v2(0x22, 0x11, &inet), ParseError::V2BadCommand),
            (v2(0x2f, 0x11, &inet), ParseError::V2BadCommand),
            (v2(0x21, 0x10, &inet), ParseError::V2BadFamily),
            (v2(0x21, 0x13, &inet), ParseError::V2BadFamily),
            (v2(0x21, 0x41, &inet), ParseError::V2BadFamily),
            (
                v2(0x21, 0x11, &inet[..11]),
                ParseError::V2AddressesTruncated,
            ),
            (v2(0x21, 0x21, &[0; 35]), ParseError::V2AddressesTruncated),
            (v2(0x21, 0x31, &[0; 215]), ParseError::V2AddressesTruncated),
            (v2(0x21, 0x00, &vec![0; 4081]), ParseError::V2TooLong),
        ];
        for (input, error) in cases {
            assert_eq!(parse(input), Err(*error), "{input:02x?}");
        }
    }

    #[test]
    fn v2_errors_come_as_soon_as_the_bad_byte_arrives() {
        let mut input = V2_SIGNATURE.to_vec();
        input.push(0x21);
        input.push(0x99);
        assert_eq!(
            parse(&input[..13]),
            Ok(Parsed::Incomplete { min_header_len: 16 })
        );
        assert_eq!(parse(&input), Err(ParseError::V2BadFamily));
        // A huge or too short length is refused before waiting for the body.
        let huge = [&V2_SIGNATURE[..], &[0x21, 0x11, 0xff, 0xff]].concat();
        assert_eq!(parse(&huge), Err(ParseError::V2TooLong));
        let short = [&V2_SIGNATURE[..], &[0x21, 0x21, 0x00, 0x0c]].concat();
        assert_eq!(parse(&short), Err(ParseError::V2AddressesTruncated));
    }

    // ---- detection ----

    #[test]
    fn other_protocols_are_rejected_at_the_first_byte_that_gives_them_away() {
        assert_eq!(parse(b""), Ok(Parsed::Incomplete { min_header_len: 15 }));
        assert_eq!(parse(b"G"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"\x16\x03\x01"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"SSH-2.0-OpenSSH"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"P"), Ok(Parsed::Incomplete { min_header_len: 15 }));
        assert_eq!(
            parse(b"PROX"),
            Ok(Parsed::Incomplete { min_header_len: 15 })
        );
        assert_eq!(
            parse(b"PROXY"),
            Ok(Parsed::Incomplete { min_header_len: 15 })
        );
        assert_eq!(parse(b"POST / HTTP/1.1"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"PROXYX"), Err(ParseError::NotProxy));
        assert_eq!(
            parse(b"\r\n\r\n"),
            Ok(Parsed::Incomplete { min_header_len: 16 })
        );
        assert_eq!(
            parse(b"\r\n\r\n\0\r\nQUI"),
            Ok(Parsed::Incomplete { min_header_len: 16 })
        );
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(ParseError::NotProxy));
        assert_eq!(parse(b"\r\nGET"), Err(ParseError::NotProxy));
    }

    // ---- encoding ----

    #[test]
    fn encode_v1_text() {
        let mut out = Vec::new();
        encode_v1(addr("192.0.2.1:51234"), addr("198.51.100.2:443"), &mut out);
        assert_eq!(out, b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n");
        out.clear();
        encode_v1(addr("[2001:db8::1]:1"), addr("[::1]:2"), &mut out);
        assert_eq!(out, b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n");
    }

    #[test]
    fn encode_mixed_families_as_ipv6_with_the_ipv4_one_mapped() {
        let (client, listener) = (addr("192.0.2.1:5000"), addr("[2001:db8::1]:443"));
        let mut out = Vec::new();
        encode_v1(client, listener, &mut out);
        assert_eq!(out, b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 5000 443\r\n");
        let mapped = "[::ffff:192.0.2.1]:5000";
        assert_eq!(
            parse(&out),
            complete(out.len(), mapped, "[2001:db8::1]:443", 1)
        );

        out.clear();
        encode_v2(listener, client, &mut out);
        assert_eq!(out[13], V2_TCP6);
        assert_eq!(parse(&out), complete(52, "[2001:db8::1]:443", mapped, 2));
    }

    #[test]
    fn encode_v2_matches_the_known_bytes() {
        let mut out = Vec::new();
        encode_v2(addr("192.0.2.1:51234"), addr("198.51.100.2:443"), &mut out);
        let expected = [
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
            0x00, 0x0c, 192, 0, 2, 1, 198, 51, 100, 2, 0xc8, 0x22, 0x01, 0xbb,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn encode_v2_local_is_16_bytes_without_addresses() {
        let mut out = vec![b'x'];
        encode_v2_local(&mut out);
        let expected = [&b"x"[..], &V2_SIGNATURE, &[0x20, 0x00, 0x00, 0x00]].concat();
        assert_eq!(out, expected);
        assert_eq!(parse(&out[1..]), no_addresses(16, 2));
    }

    #[test]
    fn round_trip_random_addresses() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::new();
        for _ in 0..2000 {
            let (src, dst) = (rng.socket_addr(), rng.socket_addr());
            // Mixed families come back as IPv6, the IPv4 side mapped.
            let (want_src, want_dst) = if src.is_ipv4() == dst.is_ipv4() {
                (src, dst)
            } else {
                let mapped = |a: SocketAddr| SocketAddr::new(as_ipv6(a.ip()).into(), a.port());
                (mapped(src), mapped(dst))
            };
            for (version, encode) in [(1, encode_v1 as fn(_, _, &mut _)), (2, encode_v2)] {
                out.clear();
                encode(src, dst, &mut out);
                assert!(out.len() <= V1_MAX_LEN, "{out:?}");
                let expected = Parsed::Complete {
                    header_len: out.len(),
                    source: Some(want_src),
                    destination: Some(want_dst),
                    version,
                };
                assert_eq!(parse(&out), Ok(expected), "{src} {dst} v{version}");
            }
        }
    }

    // ---- invariants over many inputs (what the fuzz target checks) ----

    fn valid_headers() -> Vec<Vec<u8>> {
        let mut headers = vec![
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN 1.2.3.4 x\r\n".to_vec(),
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n".to_vec(),
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x00, &[7; 5]),
            v2(0x21, 0x31, &[0; 216]),
            v2(
                0x21,
                0x11,
                &[1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 0, 10, 0x04, 0x00, 0x01, 0],
            ),
        ];
        let mut rng = Rng(42);
        for _ in 0..20 {
            let (src, dst) = (rng.socket_addr(), rng.socket_addr());
            let mut out = Vec::new();
            encode_v1(src, dst, &mut out);
            headers.push(out.clone());
            out.clear();
            encode_v2(src, dst, &mut out);
            headers.push(out);
        }
        headers
    }

    #[test]
    fn every_truncation_of_a_valid_header_is_incomplete() {
        for header in valid_headers() {
            let Ok(Parsed::Complete { header_len, .. }) = parse(&header) else {
                panic!("{header:?} does not parse");
            };
            assert_eq!(header_len, header.len());
            for len in 0..header.len() {
                match parse(&header[..len]) {
                    Ok(Parsed::Incomplete { min_header_len }) => {
                        assert!(len < min_header_len && min_header_len <= header_len)
                    }
                    other => panic!("{:?}: {other:?}", &header[..len]),
                }
            }
            let mut with_payload = header.clone();
            with_payload.extend_from_slice(b"\r\n\r\nPROXY payload");
            assert_eq!(parse(&with_payload), parse(&header));
            assert_parse_invariants(&with_payload);
        }
    }

    #[test]
    fn invariants_hold_for_pseudo_random_inputs() {
        let headers = valid_headers();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let alphabet = b"PROXY TCP46UNKNOW0123456789abcdef:.\r\n \x00\x11\x21\x20\x31";
        for _ in 0..5000 {
            let mut input = headers[rng.below(headers.len())].clone();
            // Mutate a valid header: flip, replace, insert or cut bytes, then maybe add payload.
            for _ in 0..rng.below(4) {
                let at = rng.below(input.len() + 1);
                match rng.below(4) {
                    0 if at < input.len() => input[at] ^= 1 << rng.below(8),
                    1 if at < input.len() => input[at] = alphabet[rng.below(alphabet.len())],
                    2 => input.insert(at, alphabet[rng.below(alphabet.len())]),
                    _ => input.truncate(at.max(1)),
                }
            }
            for _ in 0..rng.below(8) {
                input.push(rng.next() as u8);
            }
            assert_parse_invariants(&input);
        }
        for _ in 0..1000 {
            let len = rng.below(64);
            let mut input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(first) = input.first_mut() {
                *first = [b'P', b'\r', *first][rng.below(3)];
            }
            assert_parse_invariants(&input);
        }
    }
}
