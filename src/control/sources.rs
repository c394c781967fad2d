//! Where the backend list comes from: `--backend` flags, `--backends-file` and `--backend-dns`.
//! The control thread merges them into one list; a source that fails keeps its last good list,
//! so a bad edit or a DNS outage never empties the pool.

use std::net::IpAddr;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::warn;

use crate::config::{BackendSpec, Config};
use crate::discovery::backends_file::{self, FileWatch};
use crate::discovery::dns::{self, DnsTarget};

pub struct Sources {
    flags: Vec<BackendSpec>,
    file: Option<FileWatch>,
    file_backends: Vec<BackendSpec>,
    dns: Vec<(DnsTarget, Vec<BackendSpec>)>,
}

/// A fresh answer for one `--backend-dns` target.
pub struct DnsAnswer {
    pub target: usize,
    pub result: Result<Vec<IpAddr>, String>,
}

impl Sources {
    /// Reads every source once. At start-up a source that cannot be read is an error: better to
    /// refuse to start than to serve with a list the operator did not write.
    pub fn load(config: &Config) -> Result<Sources, String> {
        let mut sources = Sources {
            flags: config.backends.clone(),
            file: config.backends_file.as_ref().map(FileWatch::new),
            file_backends: Vec::new(),
            dns: config
                .backend_dns
                .iter()
                .map(|t| (t.clone(), Vec::new()))
                .collect(),
        };
        if let Some(watch) = &mut sources.file {
            watch.changed(); // remember the current version
            sources.file_backends = backends_file::load(watch.path())?;
        }
        let nameserver = nameserver(config)?;
        for (target, backends) in &mut sources.dns {
            let addrs = dns::resolve(&target.name, nameserver, Duration::from_secs(3))
                .map_err(|e| format!("--backend-dns {target}: {e}"))?;
            *backends = dns::backends_from_addresses(target, &addrs);
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
            Ok(addrs) => {
                let fresh = dns::backends_from_addresses(target, &addrs);
                if fresh == *backends {
                    return false;
                }
                *backends = fresh;
                true
            }
            Err(e) => {
                warn!("--backend-dns {target}: {e}; keeping the last answer");
                false
            }
        }
    }
}

pub fn nameserver(config: &Config) -> Result<std::net::SocketAddr, String> {
    match config.dns_server {
        Some(server) => Ok(server),
        None if config.backend_dns.is_empty() => Ok(([127, 0, 0, 1], 53).into()),
        None => dns::system_nameserver().ok_or_else(|| {
            "--backend-dns: no nameserver in /etc/resolv.conf; give --dns-server".into()
        }),
    }
}

/// Resolves every target each `refresh` on a thread of its own (a slow DNS server must not stall
/// the control loop) until `stop` is disconnected.
pub fn spawn_dns_refresher(
    targets: Vec<DnsTarget>,
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
                let result =
                    dns::resolve(&target.name, nameserver, timeout).map_err(|e| e.to_string());
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
