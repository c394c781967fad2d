//! DNS messages in RFC 1035 wire format, only as much as an A/AAAA lookup needs (pure: no I/O).
//!
//! - [`encode_name`] checks a name and turns it into wire form (length-prefixed labels).
//! - [`build_query`] makes a recursive query for one name and type, with an EDNS(0) record
//!   offering a 1232-byte UDP payload (RFC 6891; the size DNS Flag Day 2020 settled on), so that
//!   answers with a few dozen addresses still fit in one datagram.
//! - [`parse_response`] checks that a packet answers that query and returns its addresses.
//!
//! Every read from the packet is bounds-checked; malformed input gives an error, never a panic.
//! Compression pointers (RFC 1035 4.1.4) must point backwards, and a name may follow at most
//! [`MAX_POINTER_JUMPS`] of them, so a pointer loop cannot make the parser spin.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordType {
    A,
    Aaaa,
}

impl RecordType {
    fn code(self) -> u16 {
        match self {
            RecordType::A => TYPE_A,
            RecordType::Aaaa => TYPE_AAAA,
        }
    }
}

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

const HEADER_LEN: usize = 12;
const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const OPCODE_MASK: u16 = 0x7800;
const RCODE_MASK: u16 = 0x000f;

pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;

/// The UDP payload size we offer in EDNS(0); also what we read per datagram (with headroom).
pub const EDNS_UDP_PAYLOAD: u16 = 1232;
/// A name in wire form is at most 255 bytes (RFC 1035 2.3.4).
const MAX_NAME_LEN: usize = 255;
const MAX_LABEL_LEN: usize = 63;
/// More than enough for any real name (each jump must go backwards anyway).
pub const MAX_POINTER_JUMPS: usize = 32;
/// A CNAME chain longer than this is treated as a loop.
const MAX_CNAME_CHAIN: usize = 16;

/// Why a response could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// Not a response to this query (wrong ID, not a response, another question): ignore it
    /// and keep waiting, it may be a late answer to an earlier query or a spoofing attempt.
    NotOurs,
    /// The TC bit: the answer did not fit; ask again over TCP.
    Truncated,
    /// The server answered with an error code (NXDOMAIN, SERVFAIL, REFUSED, ...).
    Rcode(u8),
    /// The packet breaks the format.
    Malformed(&'static str),
}

/// Checks `name` and returns it in wire form. A trailing dot is allowed; labels are 1 to 63
/// bytes of letters, digits, `-` and `_`.
pub fn encode_name(name: &str) -> Result<Vec<u8>, String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(format!("'{name}' is not a DNS name"));
    }
    let mut wire = Vec::with_capacity(trimmed.len() + 2);
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "'{name}' is not a DNS name (each dot-separated label must be 1 to 63 characters)"
            ));
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(format!(
                "'{name}' is not a DNS name (letters, digits, '-', '_' and '.' only)"
            ));
        }
        wire.push(label.len() as u8);
        wire.extend_from_slice(label.as_bytes());
    }
    wire.push(0);
    if wire.len() > MAX_NAME_LEN {
        return Err(format!("'{name}' is longer than a DNS name may be"));
    }
    Ok(wire)
}

/// A recursive query for `qname` (wire form, from [`encode_name`]) of type `qtype`.
pub fn build_query(id: u16, qname: &[u8], qtype: RecordType) -> Vec<u8> {
    let mut packet = Vec::with_capacity(HEADER_LEN + qname.len() + 4 + 11);
    put_u16(&mut packet, id);
    put_u16(&mut packet, FLAG_RD);
    put_u16(&mut packet, 1); // questions
    put_u16(&mut packet, 0); // answers
    put_u16(&mut packet, 0); // authority
    put_u16(&mut packet, 1); // additional: the EDNS OPT record
    packet.extend_from_slice(qname);
    put_u16(&mut packet, qtype.code());
    put_u16(&mut packet, CLASS_IN);
    // OPT pseudo-record (RFC 6891 6.1.2): root name, type, class = UDP payload size,
    // TTL = extended rcode 0, version 0, flags 0; no options.
    packet.push(0);
    put_u16(&mut packet, TYPE_OPT);
    put_u16(&mut packet, EDNS_UDP_PAYLOAD);
    packet.extend_from_slice(&[0, 0, 0, 0]);
    put_u16(&mut packet, 0);
    packet
}

fn put_u16(packet: &mut Vec<u8>, value: u16) {
    packet.extend_from_slice(&value.to_be_bytes());
}

/// The addresses a response to query (`id`, `qname`, `qtype`) gives for `qname`: the records of
/// type `qtype` owned by `qname` or by a name it is an alias of (CNAME records are followed
/// within the answer, in any order). May be empty: the name exists but has no such records.
pub fn parse_response(
    packet: &[u8],
    id: u16,
    qname: &[u8],
    qtype: RecordType,
) -> Result<Vec<IpAddr>, ResponseError> {
    let mut reader = Reader { packet, pos: 0 };
    let header = (|| Some((reader.u16()?, reader.u16()?, reader.u16()?, reader.u16()?)))();
    let Some((response_id, flags, questions, answers)) = header else {
        return Err(ResponseError::NotOurs);
    };
    if response_id != id || flags & FLAG_QR == 0 || flags & OPCODE_MASK != 0 || questions != 1 {
        return Err(ResponseError::NotOurs);
    }
    reader.pos = HEADER_LEN;
    let asked = reader.name().map_err(|_| ResponseError::NotOurs)?;
    let asked_type = reader.u16().ok_or(ResponseError::NotOurs)?;
    let asked_class = reader.u16().ok_or(ResponseError::NotOurs)?;
    if asked != lowercase(qname) || asked_type != qtype.code() || asked_class != CLASS_IN {
        return Err(ResponseError::NotOurs);
    }
    // Only now, with ID and question matching, do the flags and codes speak for our query.
    if flags & FLAG_TC != 0 {
        return Err(ResponseError::Truncated);
    }
    let rcode = (flags & RCODE_MASK) as u8;
    if rcode != 0 {
        return Err(ResponseError::Rcode(rcode));
    }

    let mut aliases: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut addresses: Vec<(Vec<u8>, IpAddr)> = Vec::new();
    for _ in 0..answers {
        let owner = reader.name()?;
        let (Some(rtype), Some(class), Some(_ttl), Some(rdlength)) =
            (reader.u16(), reader.u16(), reader.u32(), reader.u16())
        else {
            return Err(ResponseError::Malformed("answer record cut short"));
        };
        let rdata_start = reader.pos;
        let rdata = reader
            .bytes(usize::from(rdlength))
            .ok_or(ResponseError::Malformed("record data runs past the end"))?;
        if class != CLASS_IN {
            continue;
        }
        match rtype {
            TYPE_CNAME => {
                // The target may itself use compression pointers into the whole packet.
                let mut target_reader = Reader {
                    packet,
                    pos: rdata_start,
                };
                let target = target_reader.name()?;
                if target_reader.pos != rdata_start + usize::from(rdlength) {
                    return Err(ResponseError::Malformed("CNAME data length is wrong"));
                }
                aliases.push((owner, target));
            }
            t if t == qtype.code() => {
                let address = match (qtype, rdata.len()) {
                    (RecordType::A, 4) => {
                        IpAddr::V4(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]))
                    }
                    (RecordType::Aaaa, 16) => {
                        let mut octets = [0u8; 16];
                        octets.copy_from_slice(rdata);
                        IpAddr::V6(Ipv6Addr::from(octets))
                    }
                    _ => return Err(ResponseError::Malformed("address record of the wrong size")),
                };
                addresses.push((owner, address));
            }
            _ => {} // DNAME, RRSIG, ...: not ours to interpret.
        }
    }

    let names = alias_chain(lowercase(qname), &aliases)?;
    Ok(addresses
        .into_iter()
        .filter(|(owner, _)| names.contains(owner))
        .map(|(_, address)| address)
        .collect())
}

/// `qname` and every name it is an alias of, following CNAME records in any order.
fn alias_chain(
    qname: Vec<u8>,
    aliases: &[(Vec<u8>, Vec<u8>)],
) -> Result<Vec<Vec<u8>>, ResponseError> {
    let mut chain = vec![qname];
    while let Some((_, target)) = chain
        .last()
        .and_then(|last| aliases.iter().find(|(owner, _)| owner == last))
    {
        if chain.contains(target) || chain.len() > MAX_CNAME_CHAIN {
            return Err(ResponseError::Malformed("CNAME loop"));
        }
        chain.push(target.clone());
    }
    Ok(chain)
}

fn lowercase(name: &[u8]) -> Vec<u8> {
    name.to_ascii_lowercase()
}

/// A cursor over the packet whose reads return `None` instead of going past the end.
struct Reader<'a> {
    packet: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.packet.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(slice)
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a possibly compressed name, returning it uncompressed in lowercase wire form, and
    /// leaves the cursor after the name as it appears here (after the first pointer, if any).
    fn name(&mut self) -> Result<Vec<u8>, ResponseError> {
        let cut_short = ResponseError::Malformed("name runs past the end");
        let mut name = Vec::new();
        let mut pos = self.pos;
        let mut resume_at = None;
        let mut jumps = 0;
        loop {
            let length = *self.packet.get(pos).ok_or(cut_short.clone())?;
            match length & 0xc0 {
                0x00 if length == 0 => {
                    name.push(0);
                    self.pos = resume_at.unwrap_or(pos + 1);
                    return Ok(name);
                }
                0x00 => {
                    let label = self
                        .packet
                        .get(pos + 1..pos + 1 + usize::from(length))
                        .ok_or(cut_short.clone())?;
                    name.push(length);
                    name.extend(label.iter().map(u8::to_ascii_lowercase));
                    if name.len() >= MAX_NAME_LEN {
                        return Err(ResponseError::Malformed("name too long"));
                    }
                    pos += 1 + usize::from(length);
                }
                0xc0 => {
                    let low = *self.packet.get(pos + 1).ok_or(cut_short.clone())?;
                    let target = usize::from(length & 0x3f) << 8 | usize::from(low);
                    jumps += 1;
                    if target >= pos || jumps > MAX_POINTER_JUMPS {
                        return Err(ResponseError::Malformed("bad compression pointer"));
                    }
                    resume_at.get_or_insert(pos + 2);
                    pos = target;
                }
                _ => return Err(ResponseError::Malformed("unknown label type")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: u16 = 0x1234;

    /// Builds responses by hand, so tests can say exactly what is on the wire.
    struct Response {
        packet: Vec<u8>,
        answers: u16,
    }

    impl Response {
        /// A response header and the question of `build_query(ID, name, qtype)`.
        fn to(name: &str, qtype: RecordType, flags: u16) -> Response {
            let query = build_query(ID, &encode_name(name).unwrap(), qtype);
            let question_end = query.len() - 11; // drop the OPT record
            let mut packet = query[..question_end].to_vec();
            packet[2..4].copy_from_slice(&(FLAG_QR | FLAG_RD | 0x0080 | flags).to_be_bytes());
            packet[10..12].copy_from_slice(&[0, 0]);
            Response { packet, answers: 0 }
        }

        /// Adds an answer record; `owner` is raw wire bytes (so it may hold pointers).
        fn record(mut self, owner: &[u8], rtype: u16, rdata: &[u8]) -> Response {
            self.packet.extend_from_slice(owner);
            put_u16(&mut self.packet, rtype);
            put_u16(&mut self.packet, CLASS_IN);
            self.packet.extend_from_slice(&300u32.to_be_bytes());
            put_u16(&mut self.packet, rdata.len() as u16);
            self.packet.extend_from_slice(rdata);
            self.answers += 1;
            self.packet[6..8].copy_from_slice(&self.answers.to_be_bytes());
            self
        }
    }

    /// A pointer to the question name, at offset 12.
    const TO_QNAME: [u8; 2] = [0xc0, 12];

    fn wire(name: &str) -> Vec<u8> {
        encode_name(name).unwrap()
    }

    #[test]
    fn query_layout() {
        let q = build_query(ID, &wire("web.example"), RecordType::Aaaa);
        let expected: Vec<u8> = [
            &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1][..],
            b"\x03web\x07example\x00",
            &[0, 28, 0, 1],
            &[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(q, expected);
    }

    #[test]
    fn name_rules() {
        assert_eq!(wire("a.b."), b"\x01a\x01b\x00");
        assert_eq!(wire("_srv.x-y.Z9"), b"\x04_srv\x03x-y\x02Z9\x00");
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "a b",
            "a/b",
            "é.com",
            "a.b..",
            "10.0.0.1:80",
        ] {
            assert!(encode_name(bad).is_err(), "{bad:?}");
        }
        assert!(encode_name(&"a".repeat(63)).is_ok());
        assert!(encode_name(&"a".repeat(64)).is_err());
        let long = vec!["a".repeat(63); 4].join("."); // 4 * 64 + 1 = 257 bytes
        assert!(encode_name(&long).is_err());
        let longest = [vec!["a".repeat(63); 3], vec!["a".repeat(61)]]
            .concat()
            .join("."); // 255 bytes
        assert_eq!(encode_name(&longest).unwrap().len(), 255);
    }

    #[test]
    fn addresses_of_the_asked_type() {
        let r = Response::to("web.example", RecordType::A, 0)
            .record(&TO_QNAME, TYPE_A, &[10, 0, 0, 1])
            .record(&TO_QNAME, TYPE_A, &[10, 0, 0, 2]);
        let got = parse_response(&r.packet, ID, &wire("web.example"), RecordType::A).unwrap();
        assert_eq!(
            got,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );

        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        let r = Response::to("web.example", RecordType::Aaaa, 0).record(
            &TO_QNAME,
            TYPE_AAAA,
            &v6.octets(),
        );
        let got = parse_response(&r.packet, ID, &wire("web.example"), RecordType::Aaaa).unwrap();
        assert_eq!(got, [IpAddr::V6(v6)]);
    }

    #[test]
    fn no_records_is_an_empty_answer() {
        let r = Response::to("web.example", RecordType::Aaaa, 0);
        let got = parse_response(&r.packet, ID, &wire("web.example"), RecordType::Aaaa);
        assert_eq!(got, Ok(vec![]));
    }

    #[test]
    fn cname_chain_is_followed_and_strangers_ignored() {
        // web.example CNAME lb.example; lb.example A 10.0.0.7; other.example A 10.9.9.9
        let mut lb = b"\x02lb".to_vec();
        lb.extend_from_slice(&[0xc0, 16]); // "example" inside the question name
        let r = Response::to("Web.Example", RecordType::A, 0);
        let lb_offset = r.packet.len() + 12; // after the CNAME's owner (2) and fixed part (10)
        let r = r
            .record(&TO_QNAME, TYPE_CNAME, &lb)
            .record(&[0xc0, lb_offset as u8], TYPE_A, &[10, 0, 0, 7])
            .record(b"\x05other\xc0\x10", TYPE_A, &[10, 9, 9, 9]);
        let got = parse_response(&r.packet, ID, &wire("web.example"), RecordType::A).unwrap();
        assert_eq!(got, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn cname_after_its_target_and_loops() {
        let r = Response::to("a.example", RecordType::A, 0)
            .record(&wire("b.example"), TYPE_A, &[10, 0, 0, 8])
            .record(&TO_QNAME, TYPE_CNAME, &wire("b.example"));
        let got = parse_response(&r.packet, ID, &wire("a.example"), RecordType::A).unwrap();
        assert_eq!(got, ["10.0.0.8".parse::<IpAddr>().unwrap()]);

        let r = Response::to("a.example", RecordType::A, 0)
            .record(&TO_QNAME, TYPE_CNAME, &wire("b.example"))
            .record(&wire("b.example"), TYPE_CNAME, &wire("a.example"));
        let got = parse_response(&r.packet, ID, &wire("a.example"), RecordType::A);
        assert_eq!(got, Err(ResponseError::Malformed("CNAME loop")));
    }

    #[test]
    fn foreign_packets_are_not_ours() {
        let qname = wire("web.example");
        let good = Response::to("web.example", RecordType::A, 0).packet;
        assert!(parse_response(&good, ID, &qname, RecordType::A).is_ok());
        assert_eq!(
            parse_response(&good, ID + 1, &qname, RecordType::A),
            Err(ResponseError::NotOurs)
        );
        assert_eq!(
            parse_response(&good, ID, &qname, RecordType::Aaaa),
            Err(ResponseError::NotOurs)
        );
        assert_eq!(
            parse_response(&good, ID, &wire("web.example.org"), RecordType::A),
            Err(ResponseError::NotOurs)
        );
        // Our own query echoed back (QR clear).
        let query = build_query(ID, &qname, RecordType::A);
        assert_eq!(
            parse_response(&query, ID, &qname, RecordType::A),
            Err(ResponseError::NotOurs)
        );
        assert_eq!(
            parse_response(&good[..5], ID, &qname, RecordType::A),
            Err(ResponseError::NotOurs)
        );
    }

    #[test]
    fn truncation_and_error_codes() {
        let qname = wire("web.example");
        let r = Response::to("web.example", RecordType::A, FLAG_TC);
        assert_eq!(
            parse_response(&r.packet, ID, &qname, RecordType::A),
            Err(ResponseError::Truncated)
        );
        for rcode in [RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_REFUSED, 1, 4] {
            let r = Response::to("web.example", RecordType::A, u16::from(rcode));
            assert_eq!(
                parse_response(&r.packet, ID, &qname, RecordType::A),
                Err(ResponseError::Rcode(rcode))
            );
        }
    }

    #[test]
    fn malformed_records() {
        let qname = wire("web.example");
        let parse = |r: Response| parse_response(&r.packet, ID, &qname, RecordType::A);
        let short_a =
            Response::to("web.example", RecordType::A, 0).record(&TO_QNAME, TYPE_A, &[10, 0, 0]);
        assert_eq!(
            parse(short_a),
            Err(ResponseError::Malformed("address record of the wrong size"))
        );
        let self_pointer = Response::to("web.example", RecordType::A, 0);
        let at = self_pointer.packet.len() as u8;
        let self_pointer = self_pointer.record(&[0xc0, at], TYPE_A, &[10, 0, 0, 1]);
        assert_eq!(
            parse(self_pointer),
            Err(ResponseError::Malformed("bad compression pointer"))
        );
        let forward_pointer = Response::to("web.example", RecordType::A, 0).record(
            &[0xc0, 0xff],
            TYPE_A,
            &[1, 2, 3, 4],
        );
        assert_eq!(
            parse(forward_pointer),
            Err(ResponseError::Malformed("bad compression pointer"))
        );
        let mut missing =
            Response::to("web.example", RecordType::A, 0).record(&TO_QNAME, TYPE_A, &[10, 0, 0, 1]);
        missing.packet[7] = 2; // claims two answers, holds one
        assert!(matches!(parse(missing), Err(ResponseError::Malformed(_))));
        let mut overlong =
            Response::to("web.example", RecordType::A, 0).record(&TO_QNAME, TYPE_A, &[10, 0, 0, 1]);
        let len = overlong.packet.len();
        overlong.packet[len - 5] = 9; // rdlength 4 -> 9
        assert_eq!(
            parse(overlong),
            Err(ResponseError::Malformed("record data runs past the end"))
        );
        let reserved =
            Response::to("web.example", RecordType::A, 0).record(&[0x80, 1], TYPE_A, &[1, 2, 3, 4]);
        assert_eq!(
            parse(reserved),
            Err(ResponseError::Malformed("unknown label type"))
        );
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        let qname = wire("web.example");
        let mut lb = b"\x02lb".to_vec();
        lb.extend_from_slice(&[0xc0, 16]);
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        let seeds = [
            Response::to("web.example", RecordType::A, 0)
                .record(&TO_QNAME, TYPE_CNAME, &lb)
                .record(&TO_QNAME, TYPE_A, &[10, 0, 0, 1])
                .record(b"\x02lb\xc0\x10", TYPE_A, &[10, 0, 0, 2])
                .packet,
            Response::to("web.example", RecordType::Aaaa, 0)
                .record(&TO_QNAME, TYPE_AAAA, &v6.octets())
                .packet,
        ];
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let mut parsed_ok = 0;
        let mut try_parse = |packet: &[u8]| {
            for qtype in [RecordType::A, RecordType::Aaaa] {
                if parse_response(packet, ID, &qname, qtype).is_ok() {
                    parsed_ok += 1;
                }
            }
        };
        for seed in &seeds {
            // Every truncation of a valid response.
            for len in 0..=seed.len() {
                try_parse(&seed[..len]);
            }
            // Valid responses with a few bytes changed (keeps the header plausible, so the
            // parser gets deep into the records).
            for _ in 0..20_000 {
                let mut packet = seed.clone();
                for _ in 0..1 + random.below(4) {
                    let at = random.below(packet.len());
                    packet[at] = random.next() as u8;
                }
                if random.below(4) == 0 {
                    packet.truncate(random.below(packet.len() + 1));
                }
                try_parse(&packet);
            }
        }
        // Plain noise, with our ID in front half the time.
        for _ in 0..20_000 {
            let mut packet: Vec<u8> = (0..random.below(600))
                .map(|_| random.next() as u8)
                .collect();
            if packet.len() >= 4 && random.below(2) == 0 {
                packet[..2].copy_from_slice(&ID.to_be_bytes());
                packet[2] |= 0x80;
            }
            try_parse(&packet);
        }
        assert!(
            parsed_ok > 0,
            "the mutations should leave some responses valid"
        );
    }
}
