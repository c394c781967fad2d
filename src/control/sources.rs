//! Where the backend list comes from: `--backend` flags, `--backends-file`, `--backend-dns` and
//! `--backend-dns-srv`.
//! The control thread merges them into one list; a source that fails keeps its last good list,
//! so a bad edit or a DNS outage never empties the pool.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::warn;

use crate::config::{BackendSpec, Config};
use crate::discovery::backends_file::{self, FileWatch};
use crate::discovery::dns::{self, DnsTarget};
use crate::discovery::dns_srv::{self, SrvName};

/// A DNS name the backends come from: its A/AAAA addresses (`--backend-dns`) or its SRV
/// records (`--backend-dns-srv`).
#[derive(Clone, Debug)]
pub enum DnsSource {
    Addresses(DnsTarget),
    Srv(SrvName),
}

impl DnsSource {
    /// All the sources the configuration names, `--backend-dns` first.
    pub fn all(config: &Config) -> Vec<DnsSource> {
        let addresses = config.backend_dns.iter().cloned().map(DnsSource::Addresses);
        let srv = config.backend_dns_srv.iter().cloned().map(DnsSource::Srv);
        addresses.chain(srv).collect()
    }

    /// One lookup: the backends the name stands for now. Every `Err` means "keep the last".
    pub fn lookup(
        &self,
        nameserver: SocketAddr,
        timeout: Duration,
    ) -> Result<Vec<BackendSpec>, String> {
        match self {
            DnsSource::Addresses(target) => dns::resolve(&target.name, nameserver, timeout)
                .map(|addrs| dns::backends_from_addresses(target, &addrs)),
            DnsSource::Srv(name) => dns_srv::resolve_srv(name, nameserver, timeout)
                .map(|records| dns_srv::backends_from_srv(&records)),
        }
        .map_err(|e| e.to_string())
    }
}

impl fmt::Display for DnsSource {
    /// The flag and its value, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsSource::Addresses(target) => write!(f, "--backend-dns {target}"),
            DnsSource::Srv(name) => write!(f, "--backend-dns-srv {name}"),
        }
    }
}

pub struct Sources {
    flags: Vec<BackendSpec>,
    file: Option<FileWatch>,
    file_backends: Vec<BackendSpec>,
    dns: Vec<(DnsSource, Vec<BackendSpec>)>,
}

/// A fresh answer for one DNS source (an index into [`DnsSource::all`]).
pub struct DnsAnswer {
    pub target: usize,
    pub result: Result<Vec<BackendSpec>, String>,
}

impl Sources {
    /// Reads every source once. At start-up a source that cannot be read is an error: better to
    /// refuse to start than to serve with a list the operator did not write.
    pub fn load(config: &Config) -> Result<Sources, String> {
        let mut sources = Sources {
            flags: config.backends.clone(),
            file: config.backends_file.as_ref().map(FileWatch::new),
            file_backends: Vec::new(),
            dns: DnsSource::all(config)
                .into_iter()
                .map(|source| (source, Vec::new()))
                .collect(),
        };
        if let Some(watch) = &mut sources.file {
            watch.changed(); // remember the current version
            sources.file_backends = backends_file::load(watch.path())?;
        }
        let nameserver = nameserver(config)?;
        for (source, backends) in &mut sources.dns {
            *backends = source
                .lookup(nameserver, Duration::from_secs(3))
                .map_err(|e| format!("{source}: {e}"))?;
        }
        Ok(sources)
    }

    /// All backends, flags first, then the file, then DNS; a name given twice counts once.
    pub fn merged(&self) -> Vec<BackendSpec> {
        let mut out: Vec<BackendSpec> = Vec::new();
        let all = self
            .flags
            .iter()
            .chain(&self.file_backends)
            .chain(self.dns.iter().flat_map(|(_, b)| b));
        for spec in all {
            if !out.iter().any(|b| b.name == spec.name) {
                out.push(spec.clone());
            }
        }
        out
    }

    /// Has the backends file changed since it was last read?
    pub fn file_changed(&mut self) -> bool {
        self.file.as_mut().is_some_and(FileWatch::changed)
    }

    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// Re-reads the backends file; on error the previous list stays.
    pub fn reload_file(&mut self) -> Result<(), String> {
        let Some(watch) = &self.file else {
            return Ok(());
        };
        self.file_backends = backends_file::load(watch.path())?;
        Ok(())
    }

    /// Applies a DNS answer; returns whether the list changed. Errors keep the last good list.
    pub fn apply_dns(&mut self, answer: DnsAnswer) -> bool {
        let Some((target, backends)) = self.dns.get_mut(answer.target) else {
            return false;
        };
        match answer.result {
            Ok(fresh) => {
                if fresh == *backends {
                    return false;
                }
                *backends = fresh;
                true
            }
            Err(e) => {
                warn!("{target}: {e}; keeping the last answer");
                false
            }
        }
    }
}

pub fn nameserver(config: &Config) -> Result<std::net::SocketAddr, String> {
    match config.dns_server {
        Some(server) => Ok(server),
        None if config.backend_dns.is_empty() && config.backend_dns_srv.is_empty() => {
            Ok(([127, 0, 0, 1], 53).into())
        }
        None => dns::system_nameserver().ok_or_else(|| {
            "--backend-dns/--backend-dns-srv: no nameserver in /etc/resolv.conf; give --dns-server".into()
        }),
    }
}

/// Resolves every target each `refresh` on a thread of its own (a slow DNS server must not stall
/// the control loop) until `stop` is disconnected.
pub fn spawn_dns_refresher(
    targets: Vec<DnsSource>,
    nameserver: std::net::SocketAddr,
    refresh: Duration,
    answers: Sender<DnsAnswer>,
    stop: Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ringway-dns".into())
        .spawn(move || loop {
            match stop.recv_timeout(refresh) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            for (index, target) in targets.iter().enumerate() {
                // Each query may take seconds: look for the stop between them too.
                if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
                    return;
                }
                let timeout = refresh.min(Duration::from_secs(3));
                let result = target.lookup(nameserver, timeout);
                if answers
                    .send(DnsAnswer {
                        target: index,
                        result,
                    })
                    .is_err()
                {
                    return;
                }
            }
        })
}
