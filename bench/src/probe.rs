//! `probe`: from each of several client source addresses, connect a few times to a proxy in
//! front of `hello` backends and report which backend answered. Shows consistent hashing:
//! the same client address should land on the same backend every time.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeLine {
    pub source: IpAddr,
    /// Backend name per attempt, or "error: ..." for a failed attempt.
    pub answers: Vec<Result<String, String>>,
}

impl ProbeLine {
    pub fn all_ok(&self) -> bool {
        self.answers.iter().all(|a| a.is_ok())
    }

    /// Every attempt answered, by the same backend.
    pub fn consistent(&self) -> bool {
        self.all_ok() && self.answers.windows(2).all(|w| w[0] == w[1])
    }
}

/// One exchange: connect from `source`, read the greeting line, send a line and read its echo.
pub fn probe_once(target: SocketAddr, source: IpAddr, timeout: Duration) -> Result<String, String> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(|e| e.to_string())?;
    sock.bind(&SockAddr::from(SocketAddr::new(source, 0)))
        .map_err(|e| format!("bind {source}: {e}"))?;
    sock.connect_timeout(&SockAddr::from(target), timeout)
        .map_err(|e| format!("connect: {e}"))?;
    let stream = TcpStream::from(sock);
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut name = String::new();
    reader
        .read_line(&mut name)
        .map_err(|e| format!("greeting: {e}"))?;
    if !name.ends_with('\n') {
        return Err("connection closed before the greeting".into());
    }
    let ping = format!("ping from {source}\n");
    (&stream)
        .write_all(ping.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = String::new();
    reader
        .read_line(&mut echo)
        .map_err(|e| format!("echo: {e}"))?;
    if echo != ping {
        return Err(format!("bad echo {echo:?}"));
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
            answers: vec![Ok("b1".into()), Err("x".into())],
        };
        assert!(!failed.all_ok() && !failed.consistent());
    }
}
