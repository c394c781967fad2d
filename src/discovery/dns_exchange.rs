//! One round of DNS questions to one nameserver, on plain blocking std sockets. The messages
//! themselves (encoding, decoding, compression, EDNS) are hickory-proto's; this module only
//! moves them and decides which reply answers which question.
//!
//! How an exchange goes: every question leaves at once from one UDP socket connected to the
//! nameserver (so the kernel drops datagrams from anyone else), each with a random ID and an
//! EDNS(0) record offering a 1232-byte payload (RFC 6891; the size DNS Flag Day 2020 settled
//! on). A reply counts only if its ID and question match; anything else is ignored as a late
//! answer or a spoofing attempt. Unanswered questions are sent once more halfway through the
//! timeout. A truncated (TC) answer is asked again over TCP (RFC 1035 4.2.2: each message
//! prefixed by its 2-byte length).
//!
//! Why not hickory-resolver: it needs an async runtime (tokio) for what is, here, two
//! datagrams every few seconds on a thread of its own, and it adds a cache, search domains and
//! /etc/hosts, which `--backend-dns` deliberately does not have (see `dns`).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::dns::DnsError;

/// Sends per question over UDP: the first, and one retry for a lost datagram.
const UDP_ATTEMPTS: u32 = 2;
/// The UDP payload size we offer in EDNS(0); also what we read per datagram (with headroom).
const EDNS_UDP_PAYLOAD: u16 = 1232;

/// A question: `name` (fully qualified) and the record type asked for, class IN.
pub struct Question {
    pub name: Name,
    pub rtype: RecordType,
}

/// Asks every question and returns the answers in the same order. Every answer has passed its
/// checks: ID and question match, not truncated, response code NOERROR (an error code gives
/// the matching `DnsError`, and fails the whole exchange). Returns within about `timeout`; a
/// TCP retry after a truncated answer may take up to what remains of it again.
pub fn exchange(
    questions: &[Question],
    nameserver: SocketAddr,
    timeout: Duration,
) -> Result<Vec<Message>, DnsError> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<Pending> = questions
        .iter()
        .zip(query_ids(questions.len()))
        .map(|(question, id)| Pending::new(question, id))
        .collect::<Result<_, _>>()?;

    let io_error = |error: io::Error| match error.kind() {
        // A socket timeout on the TCP retry.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => DnsError::Timeout {
            nameserver,
            after: timeout,
        },
        _ => DnsError::Io { nameserver, error },
    };
    exchange_udp(&mut pending, nameserver, deadline).map_err(io_error)?;
    for query in &mut pending {
        if matches!(query.state, State::Truncated) {
            query.state = exchange_tcp(query, nameserver, deadline).map_err(io_error)?;
        }
    }

    pending
        .into_iter()
        .map(|query| match query.state {
            State::Answered(message) => Ok(message),
            State::Failed(error) => Err(error),
            State::Waiting | State::Truncated => Err(DnsError::Timeout {
                nameserver,
                after: timeout,
            }),
        })
        .collect()
}

/// One question on the wire and what became of it.
struct Pending<'a> {
    question: &'a Question,
    id: u16,
    packet: Vec<u8>,
    state: State,
}

enum State {
    Waiting,
    Truncated,
    Answered(Message),
    Failed(DnsError),
}

impl<'a> Pending<'a> {
    fn new(question: &'a Question, id: u16) -> Result<Pending<'a>, DnsError> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(question.name.clone(), question.rtype));
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP_PAYLOAD);
        message.set_edns(edns);
        let packet = message
            .to_vec()
            .map_err(|e| DnsError::InvalidName(format!("cannot encode the query: {e}")))?;
        Ok(Pending {
            question,
            id,
            packet,
            state: State::Waiting,
        })
    }

    fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting)
    }
}

/// What `packet` means for the question sent with `id`: `None` when it is someone else's (wrong
/// ID, not a response, another question, not even a header), to be ignored.
fn judge(packet: &[u8], id: u16, question: &Question) -> Option<State> {
    let mut decoder = BinDecoder::new(packet);
    let header = Header::read(&mut decoder).ok()?;
    let metadata = header.metadata;
    if metadata.id != id
        || metadata.message_type != MessageType::Response
        || metadata.op_code != OpCode::Query
        || header.counts.queries != 1
    {
        return None;
    }
    let asked = Message::read_queries(&mut decoder, 1).ok()?;
    let asked = asked.first()?;
    if asked.name() != &question.name
        || asked.query_type() != question.rtype
        || asked.query_class() != DNSClass::IN
    {
        return None;
    }
    // Only now, with ID and question matching, do the flags and codes speak for our query.
    // (A truncated answer is judged by its header alone: its records may be cut mid-way.)
    if metadata.truncation {
        return Some(State::Truncated);
    }
    let failed = |error| Some(State::Failed(error));
    match metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return failed(DnsError::NxDomain),
        ResponseCode::ServFail => return failed(DnsError::ServFail),
        ResponseCode::Refused => return failed(DnsError::Refused),
        other => return failed(DnsError::ServerError(u16::from(other))),
    }
    Some(match Message::from_vec(packet) {
        Ok(message) => State::Answered(message),
        Err(e) => State::Failed(DnsError::Malformed(e.to_string())),
    })
}

/// Still worth waiting: some question has no answer yet and none has failed (one failure fails
/// the exchange, so the other answers would not be used).
fn waiting(queries: &[Pending]) -> bool {
    queries.iter().any(Pending::is_waiting)
        && !queries.iter().any(|q| matches!(q.state, State::Failed(_)))
}

/// Sends every query and collects answers until all are in or `deadline`; queries still
/// unanswered at the halfway point are sent again. The reply ID is the same for a retry, so a
/// late answer to the first send is as good as one to the second.
fn exchange_udp(
    queries: &mut [Pending],
    nameserver: SocketAddr,
    deadline: Instant,
) -> io::Result<()> {
    let local: SocketAddr = match nameserver {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(nameserver)?;
    let mut buffer = vec![0u8; usize::from(EDNS_UDP_PAYLOAD) + 512];
    for attempt in 0..UDP_ATTEMPTS {
        let now = Instant::now();
        let attempt_deadline =
            now + deadline.saturating_duration_since(now) / (UDP_ATTEMPTS - attempt);
        if !waiting(queries) {
            break;
        }
        for query in queries.iter().filter(|q| q.is_waiting()) {
            socket.send(&query.packet)?;
        }
        while waiting(queries) {
            let Some(wait) = time_left(attempt_deadline) else {
                break;
            };
            socket.set_read_timeout(Some(wait))?;
            let length = match socket.recv(&mut buffer) {
                Ok(length) => length,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let response = &buffer[..length];
            for query in queries.iter_mut().filter(|q| q.is_waiting()) {
                if let Some(state) = judge(response, query.id, query.question) {
                    query.state = state;
                }
            }
        }
    }
    Ok(())
}

/// Asks `query` again over TCP.
fn exchange_tcp(query: &Pending, nameserver: SocketAddr, deadline: Instant) -> io::Result<State> {
    let timed_out = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "TCP retry of a truncated answer timed out",
        )
    };
    let mut stream =
        TcpStream::connect_timeout(&nameserver, time_left(deadline).ok_or_else(timed_out)?)?;
    let mut message = Vec::with_capacity(query.packet.len() + 2);
    message.extend_from_slice(&(query.packet.len() as u16).to_be_bytes());
    message.extend_from_slice(&query.packet);
    stream.set_write_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
    stream.write_all(&message)?;
    stream.set_read_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
    let mut length = [0u8; 2];
    stream.read_exact(&mut length)?;
    let mut response = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut response)?;
    let malformed = |why: &str| State::Failed(DnsError::Malformed(why.to_string()));
    Ok(match judge(&response, query.id, query.question) {
        None => malformed("the TCP answer is not for our query"),
        Some(State::Truncated) => malformed("truncated even over TCP"),
        Some(state) => state,
    })
}

/// What is left until `deadline`, or `None` when it has passed. Never zero, which socket
/// timeouts reject.
fn time_left(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

/// `count` distinct unpredictable query IDs, from the standard library's per-process random
/// hash keys (the random source port adds 16 more bits against off-path spoofing).
fn query_ids(count: usize) -> Vec<u16> {
    let random = RandomState::new();
    let mut ids: Vec<u16> = Vec::with_capacity(count);
    let mut n = 0u64;
    while ids.len() < count {
        let id = random.hash_one((Instant::now(), n)) as u16;
        n += 1;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};

    fn question(name: &str, rtype: RecordType) -> Question {
        Question {
            name: Name::from_ascii(name).unwrap(),
            rtype,
        }
    }

    /// A response to the query `id` for `name`/`rtype`, with `code` and one A record.
    fn response(id: u16, name: &str, rtype: RecordType, code: ResponseCode) -> Message {
        let mut message = Message::response(id, OpCode::Query);
        message.metadata.response_code = code;
        let name = Name::from_ascii(name).unwrap();
        message.add_query(Query::query(name.clone(), rtype));
        message.add_answer(Record::from_rdata(
            name,
            60,
            RData::A(A("10.0.0.1".parse().unwrap())),
        ));
        message
    }

    fn judged(message: &Message, id: u16, q: &Question) -> Option<State> {
        judge(&message.to_vec().unwrap(), id, q)
    }

    #[test]
    fn foreign_packets_are_not_ours() {
        let q = question("web.example.", RecordType::A);
        let good = response(7, "Web.Example.", RecordType::A, ResponseCode::NoError);
        assert!(matches!(judged(&good, 7, &q), Some(State::Answered(_))));
        assert!(judged(&good, 8, &q).is_none(), "another ID");
        let aaaa = question("web.example.", RecordType::AAAA);
        assert!(judged(&good, 7, &aaaa).is_none(), "another type");
        let other = question("web.example.org.", RecordType::A);
        assert!(judged(&good, 7, &other).is_none(), "another name");
        // Our own query echoed back (QR clear).
        let mut echo = good.clone();
        echo.metadata.message_type = MessageType::Query;
        assert!(judged(&echo, 7, &q).is_none());
        let bytes = good.to_vec().unwrap();
        assert!(judge(&bytes[..5], 7, &q).is_none(), "not even a header");
    }

    #[test]
    fn truncation_and_error_codes() {
        let q = question("web.example.", RecordType::A);
        let mut cut = response(7, "web.example.", RecordType::A, ResponseCode::NoError);
        cut.metadata.truncation = true;
        // Judged on the header: the records of a truncated answer may be cut anywhere.
        let mut bytes = cut.to_vec().unwrap();
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(judge(&bytes, 7, &q), Some(State::Truncated)));
        let expect = [
            (ResponseCode::NXDomain, "the name does not exist (NXDOMAIN)"),
            (
                ResponseCode::ServFail,
                "the nameserver failed to answer (SERVFAIL)",
            ),
            (
                ResponseCode::Refused,
                "the nameserver refused the query (REFUSED)",
            ),
            (
                ResponseCode::FormErr,
                "the nameserver answered with error code 1",
            ),
        ];
        for (code, text) in expect {
            let message = response(7, "web.example.", RecordType::A, code);
            match judged(&message, 7, &q) {
                Some(State::Failed(error)) => assert_eq!(error.to_string(), text),
                _ => panic!("{code:?} should fail the query"),
            }
        }
    }

    #[test]
    fn broken_records_after_a_matching_question_are_malformed() {
        let q = question("web.example.", RecordType::A);
        let good = response(7, "web.example.", RecordType::A, ResponseCode::NoError);
        let bytes = good.to_vec().unwrap();
        // Cut inside the answer record: the header and question still match.
        let cut = &bytes[..bytes.len() - 2];
        match judge(cut, 7, &q) {
            Some(State::Failed(DnsError::Malformed(_))) => {}
            _ => panic!("a cut record should be malformed"),
        }
    }

    #[test]
    fn ids_are_distinct() {
        for _ in 0..100 {
            let ids = query_ids(3);
            assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        let q = question("web.example.", RecordType::A);
        let seed = response(7, "web.example.", RecordType::A, ResponseCode::NoError)
            .to_vec()
            .unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut answered = 0;
        for len in 0..=seed.len() {
            let _ = judge(&seed[..len], 7, &q);
        }
        for _ in 0..20_000 {
            let mut packet = seed.clone();
            for _ in 0..1 + random() % 4 {
                let at = (random() % packet.len() as u64) as usize;
                packet[at] = random() as u8;
            }
            if matches!(judge(&packet, 7, &q), Some(State::Answered(_))) {
                answered += 1;
            }
        }
        assert!(answered > 0, "some mutations leave a valid answer");
    }
}
