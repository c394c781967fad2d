//! `probe`: from each of several client source addresses, connect a few times to a proxy in
//! front of `hello` backends and report which backend answered. Shows consistent hashing:
//! the same client address should land on the same backend every time.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// The attempt was still waiting (for the connect, the greeting or the echo) when its
    /// timeout ran out: unfinished work, not a refusal or a wrong answer.
    pub unfinished: bool,
    pub message: String,
}

impl ProbeFailure {
    fn other(message: String) -> Self {
        ProbeFailure {
            unfinished: false,
            message,
        }
    }

    /// A failed step; a timeout makes it unfinished.
    fn io(step: &str, e: &io::Error, timeout: Duration) -> Self {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ProbeFailure {
                unfinished: true,
                message: format!("unfinished: no {step} within {timeout:?}"),
            }
        } else {
            ProbeFailure::other(format!("{step}: {e}"))
        }
    }
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLine {
    pub source: IpAddr,
    /// Backend name per attempt, or why the attempt failed.
    pub answers: Vec<Result<String, ProbeFailure>>,
}

impl ProbeLine {
    pub fn all_ok(&self) -> bool {
        self.answers.iter().all(|a| a.is_ok())
    }

    /// Attempts that timed out waiting (see `ProbeFailure::unfinished`).
    pub fn unfinished(&self) -> usize {
        self.answers
            .iter()
            .filter(|a| matches!(a, Err(f) if f.unfinished))
            .count()
    }

    /// Every attempt answered, by the same backend.
    pub fn consistent(&self) -> bool {
        self.all_ok() && self.answers.windows(2).all(|w| w[0] == w[1])
    }
}

/// One exchange: connect from `source`, read the greeting line, send a line and read its echo.
/// Each step waits at most `timeout`.
pub fn probe_once(
    target: SocketAddr,
    source: IpAddr,
    timeout: Duration,
) -> Result<String, ProbeFailure> {
    let other = |e: io::Error| ProbeFailure::other(e.to_string());
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(other)?;
    sock.bind(&SockAddr::from(SocketAddr::new(source, 0)))
        .map_err(|e| ProbeFailure::other(format!("bind {source}: {e}")))?;
    sock.connect_timeout(&SockAddr::from(target), timeout)
        .map_err(|e| ProbeFailure::io("connect", &e, timeout))?;
    let stream = TcpStream::from(sock);
    stream.set_read_timeout(Some(timeout)).map_err(other)?;
    stream.set_write_timeout(Some(timeout)).map_err(other)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(other)?);
    let mut name = String::new();
    reader
        .read_line(&mut name)
        .map_err(|e| ProbeFailure::io("greeting", &e, timeout))?;
    if !name.ends_with('\n') {
        return Err(ProbeFailure::other(
            "connection closed before the greeting".into(),
        ));
    }
    let ping = format!("ping from {source}\n");
    (&stream)
        .write_all(ping.as_bytes())
        .map_err(|e| ProbeFailure::io("write", &e, timeout))?;
    let mut echo = String::new();
    reader
        .read_line(&mut echo)
        .map_err(|e| ProbeFailure::io("echo", &e, timeout))?;
    if echo != ping {
        return Err(ProbeFailure::other(format!("bad echo {echo:?}")));
    }
    Ok(name.trim_end().to_string())
}

pub fn probe(
    target: SocketAddr,
    sources: &[IpAddr],
    times: usize,
    timeout: Duration,
) -> Vec<ProbeLine> {
    sources
        .iter()
        .map(|&source| ProbeLine {
            source,
            answers: (0..times)
                .map(|_| probe_once(target, source, timeout))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_rules() {
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let same = ProbeLine {
            source: ip,
            answers: vec![Ok("b1".into()), Ok("b1".into())],
        };
        assert!(same.consistent());
        let moved = ProbeLine {
            source: ip,
            answers: vec![Ok("b1".into()), Ok("b2".into())],
        };
        assert!(moved.all_ok() && !moved.consistent());
        let failed = ProbeLine {
            source: ip,
            answers: vec![Ok("b1".into()), Err(ProbeFailure::other("x".into()))],
        };
        assert!(!failed.all_ok() && !failed.consistent());
        assert_eq!(failed.unfinished(), 0);
        let timed_out = io::Error::from(io::ErrorKind::WouldBlock);
        let stuck = ProbeLine {
            source: ip,
            answers: vec![
                Ok("b1".into()),
                Err(ProbeFailure::io(
                    "greeting",
                    &timed_out,
                    Duration::from_secs(2),
                )),
            ],
        };
        assert!(!stuck.all_ok());
        assert_eq!(stuck.unfinished(), 1);
        assert_eq!(
            stuck.answers[1].as_ref().unwrap_err().to_string(),
            "unfinished: no greeting within 2s"
        );
    }
}
