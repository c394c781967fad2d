//! Frames over a Unix stream socket, with descriptors passed beside them (SCM_RIGHTS).
//!
//! Each frame goes out in one `sendmsg` carrying its descriptors. On a stream socket the
//! kernel delivers descriptors with the first byte of the `sendmsg` that carried them, never
//! merging two such messages' descriptors into one `recvmsg`; so the receiver keeps one FIFO of
//! descriptors received so far and gives each decoded frame as many from its front as the
//! frame's header says. Descriptors are received with `MSG_CMSG_CLOEXEC`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

use super::protocol::{self, Message, HEADER_LEN, MAX_FDS_PER_FRAME};

/// One end of a handover connection.
pub struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet decoded.
    inbox: Vec<u8>,
    /// Descriptors received and not yet given to a frame, oldest first.
    fds: VecDeque<OwnedFd>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            inbox: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// How long `recv` may wait for the peer; `None` for ever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)
    }

    /// The peer has closed its end (or sent something unasked, which this side would only read
    /// as a protocol error later): checked without blocking.
    pub fn peer_closed(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd we pass, for the length we pass.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Sends `message` with `fds` (as many as the message says, at most `MAX_FDS_PER_FRAME`).
    pub fn send(&mut self, message: &Message, fds: &[RawFd]) -> io::Result<()> {
        if fds.len() != message.fd_count() || fds.len() > MAX_FDS_PER_FRAME {
            return Err(io::Error::other(format!(
                "a {} with {} descriptors (it needs {}, at most {MAX_FDS_PER_FRAME})",
                message.name(),
                fds.len(),
                message.fd_count()
            )));
        }
        let frame = protocol::encode(message);
        let mut sent = 0;
        while sent < frame.len() {
            let iov = [IoSlice::new(&frame[sent..])];
            // Descriptors go with the first part only.
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
                &rights
            } else {
                &[]
            };
            match socket::sendmsg::<()>(
                self.stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }

    /// Receives the next frame and its descriptors. EOF before a whole frame is
    /// `UnexpectedEof`; a timeout is `WouldBlock`/`TimedOut`.
    pub fn recv(&mut self) -> io::Result<(Message, Vec<OwnedFd>)> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(frame);
            }
            self.fill()?;
        }
    }

    fn take_frame(&mut self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        if self.inbox.len() < HEADER_LEN {
            return Ok(None);
        }
        let header_bytes: [u8; HEADER_LEN] = self.inbox[..HEADER_LEN]
            .try_into()
            .map_err(io::Error::other)?;
        let header = protocol::decode_header(&header_bytes).map_err(invalid)?;
        if self.inbox.len() < HEADER_LEN + header.len {
            return Ok(None);
        }
        if self.fds.len() < header.fds {
            return Err(invalid(format!(
                "a frame says {} descriptors came with it, {} arrived",
                header.fds,
                self.fds.len()
            )));
        }
        let message = protocol::decode(header, &self.inbox[HEADER_LEN..HEADER_LEN + header.len])
            .map_err(invalid)?;
        self.inbox.drain(..HEADER_LEN + header.len);
        let fds = self.fds.drain(..header.fds).collect();
        Ok(Some((message, fds)))
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut space = nix::cmsg_space!([RawFd; 253]);
        let (read, received) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match socket::recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut received = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for cmsg in cmsgs {
                            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                                received.extend(fds);
                            }
                        }
                    }
                    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                        close_all(&received);
                        return Err(invalid("descriptors were cut off (MSG_CTRUNC)"));
                    }
                    break (msg.bytes, received);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        };
        for fd in received {
            // SAFETY: SCM_RIGHTS gave this process a new descriptor that nothing else owns.
            self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the connection",
            ));
        }
        self.inbox.extend_from_slice(&buf[..read]);
        Ok(())
    }
}

fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: descriptors just received and owned by nobody else; closed exactly once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::protocol::{FlowState, PipeState};
    use std::io::{Read, Write};

    #[test]
    fn frames_and_their_descriptors_arrive_together_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a), Conn::new(b));
        // Three pipes; the receiver must get each frame's own descriptors.
        let pipes: Vec<(std::io::PipeReader, std::io::PipeWriter)> =
            (0..3).map(|_| std::io::pipe().unwrap()).collect();
        let state = |n: u8| FlowState {
            client: "127.0.0.1:1".parse().unwrap(),
            backend: Some(format!("b{n}")),
            bytes: [0, 0],
            age: Duration::ZERO,
            idle: Duration::ZERO,
            connect_time: None,
            pipes: [
                PipeState {
                    pending: vec![n; 100_000],
                    ..Default::default()
                },
                PipeState::default(),
            ],
            quiesced_at: 0,
        };
        let sender = std::thread::spawn(move || {
            for (i, (reader, writer)) in pipes.iter().enumerate() {
                let message = Message::Flows {
                    batch: i as u64,
                    flows: vec![state(i as u8)],
                };
                a.send(&message, &[reader.as_raw_fd(), writer.as_raw_fd()])
                    .unwrap();
            }
            a.send(&Message::Done { flows: 3 }, &[]).unwrap();
            pipes
        });
        for i in 0..3u8 {
            let (message, fds) = b.recv().unwrap();
            let Message::Flows { batch, flows } = message else {
                panic!("{message:?}")
            };
            assert_eq!(batch, u64::from(i));
            assert_eq!(flows[0].pipes[0].pending, vec![i; 100_000]);
            assert_eq!(fds.len(), 2);
            // The second descriptor is the write end of pipe i: what we write shows up there.
            let mut writer = std::fs::File::from(fds.into_iter().nth(1).unwrap());
            writer.write_all(&[i]).unwrap();
        }
        assert_eq!(b.recv().unwrap().0, Message::Done { flows: 3 });
        let pipes = sender.join().unwrap();
        for (i, (mut reader, _)) in pipes.into_iter().enumerate() {
            let mut byte = [0u8];
            reader.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], i as u8);
        }
    }

    #[test]
    fn a_closed_peer_is_an_eof_error() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let e = Conn::new(b).recv().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut b = Conn::new(b);
        b.set_timeout(Some(Duration::from_millis(50))).unwrap();
        let e = b.recv().unwrap_err();
        assert!(matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
    }
}
