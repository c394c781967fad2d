//! The edge policy a worker applies to each flow: who may connect (access list, per-source
//! limit), PROXY protocol in and out, and the socket options of backend connections.
//! Built once from the configuration and shared read-only by all workers.

use std::io;
use std::net::{IpAddr, SocketAddr};

use log::debug;
use socket2::{SockAddr, Socket, TcpKeepalive};

use crate::acl::{AccessList, TrustedProxies};
use crate::config::{EdgeConfig, Keepalive, ProxyVersion};
use crate::flow::CloseReason;
use crate::net;
use crate::proxy_protocol;
use crate::source_limit::{SourceLimiter, SourceTicket};
use crate::tcp_fastopen;

pub struct Edge {
    send_proxy: Option<ProxyVersion>,
    /// `Some`: read a PROXY header from every client, which must come from these networks.
    pub trusted: Option<TrustedProxies>,
    pub header_timeout: std::time::Duration,
    access: Option<AccessList>,
    per_source: Option<SourceLimiter>,
    keepalive: Option<Keepalive>,
    nodelay: bool,
    sources: Vec<IpAddr>,
    tcp_fastopen: Option<u32>,
    backend_fastopen: bool,
}

impl Edge {
    pub fn new(config: &EdgeConfig, seed: u64) -> Edge {
        let access = (!config.allow.is_empty() || !config.deny.is_empty())
            .then(|| AccessList::new(&config.allow, &config.deny));
        Edge {
            send_proxy: config.send_proxy,
            trusted: config
                .accept_proxy
                .then(|| TrustedProxies::new(&config.trusted_proxies)),
            header_timeout: config.proxy_header_timeout,
            access,
            per_source: config
                .max_conns_per_source
                .map(|limit| SourceLimiter::new(limit, seed)),
            keepalive: config.keepalive,
            nodelay: config.nodelay,
            sources: config.sources.clone(),
            tcp_fastopen: config.tcp_fastopen,
            backend_fastopen: config.backend_fastopen,
        }
    }

    /// May this client open a flow? On success the flow holds a per-source ticket (if limits are
    /// on) that must be given back with `release`.
    pub fn admit(&self, client: IpAddr) -> Result<Option<SourceTicket>, CloseReason> {
        if let Some(access) = &self.access {
            if !access.permits(client) {
                return Err(CloseReason::Denied);
            }
        }
        match &self.per_source {
            None => Ok(None),
            Some(limiter) => limiter
                .acquire(client)
                .map(Some)
                .ok_or(CloseReason::SourceLimit),
        }
    }

    pub fn release(&self, ticket: SourceTicket) {
        if let Some(limiter) = &self.per_source {
            limiter.release(ticket);
        }
    }

    /// The PROXY header this flow sends its backend, if `--send-proxy` is on.
    pub fn proxy_header(&self, client: SocketAddr, local: SocketAddr, out: &mut Vec<u8>) {
        match self.send_proxy {
            Some(ProxyVersion::V1) => proxy_protocol::encode_v1(client, local, out),
            Some(ProxyVersion::V2) => proxy_protocol::encode_v2(client, local, out),
            None => {}
        }
    }

    pub fn sends_proxy_header(&self) -> bool {
        self.send_proxy.is_some()
    }

    /// Socket options for listeners; accepted sockets inherit TCP_NODELAY and keepalive from
    /// the listener, which saves two system calls per flow.
    pub fn configure_listener(&self, socket: &Socket) -> io::Result<()> {
        self.configure(socket)?;
        if let Some(queue) = self.tcp_fastopen {
            tcp_fastopen::enable_on_listener(socket, queue)?;
        }
        Ok(())
    }

    fn configure(&self, socket: &Socket) -> io::Result<()> {
        socket.set_tcp_nodelay(self.nodelay)?;
        if let Some(k) = self.keepalive {
            let params = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            socket.set_tcp_keepalive(&params)?;
        }
        Ok(())
    }

    /// A socket for a connection to `addr`: options set and, with `--source`, bound to the next
    /// source address of the same family. IP_BIND_ADDRESS_NO_PORT defers the port choice to
    /// connect(), so each source address can carry ~60k flows *per backend* instead of ~60k in
    /// total.
    pub fn backend_socket(&self, addr: &SocketAddr, turn: &mut usize) -> io::Result<Socket> {
        let socket = net::backend_socket(addr)?;
        self.configure(&socket)?;
        if self.backend_fastopen {
            tcp_fastopen::enable_on_connect(&socket)?;
        }
        let family: Vec<&IpAddr> = self
            .sources
            .iter()
            .filter(|ip| ip.is_ipv4() == addr.is_ipv4())
            .collect();
        if !family.is_empty() {
            let ip = *family[*turn % family.len()];
            *turn = turn.wrapping_add(1);
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(io::Error::from)?;
            socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
        }
        Ok(socket)
    }

    /// Is the peer that connected allowed to send a PROXY header?
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let trusted = self.trusted.as_ref().is_some_and(|t| t.contains(peer));
        if !trusted {
            debug!("{peer} is not a --trusted-proxy: closed");
        }
        trusted
    }
}
