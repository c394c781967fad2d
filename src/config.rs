//! Command-line flags and their validation into a `Config` (pure: no sockets, no DNS).
//!
//! Parsing is split in two steps so that every mistake an operator can make in a flag is caught
//! here with a one-line message naming the flag (exit status 2), while problems that depend on the
//! machine (a busy port, a name that does not resolve) are found later at start-up (exit status 1).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use argh::FromArgs;

use crate::acl::Cidr;
use crate::balance::{Algorithm, HashKey, DEFAULT_VNODES};
use crate::discovery::dns::DnsTarget;
use crate::discovery::dns_srv::SrvName;

/// Ringway: a Layer-4 TCP proxy and load balancer on io_uring. Each client flow is pinned to one
/// backend by consistent hashing of the client address; bytes are relayed both ways unchanged.
#[derive(FromArgs, Debug, Default)]
pub struct Flags {
    /// address to accept clients on, e.g. 0.0.0.0:8080 or [::]:8080 (port 0 picks a free port)
    #[argh(option)]
    pub listen: Option<String>,

    /// a backend as HOST:PORT[,weight=N][,backup][,check-port=N]; repeat for each backend
    #[argh(option)]
    pub backend: Vec<String>,

    /// worker threads, each pinned to one CPU (default: CPUs in this process's affinity mask)
    #[argh(option)]
    pub workers: Option<String>,

    /// what identifies a flow for hashing: src-ip (default; a client keeps its backend) or src-ip-port
    #[argh(option)]
    pub hash_key: Option<String>,

    /// points on the hash ring per unit of backend weight (default 400)
    #[argh(option)]
    pub vnodes: Option<String>,

    /// seed of the stable flow-key hash; hosts that must agree on the mapping use the same seed (default 0)
    #[argh(option)]
    pub hash_seed: Option<String>,

    /// how long a backend connect may take before the next backend is tried (default 3s)
    #[argh(option)]
    pub connect_timeout: Option<String>,

    /// close a flow with no bytes in either direction for this long; 0 disables (default 10m)
    #[argh(option)]
    pub idle_timeout: Option<String>,

    /// on connect failure, try up to N further distinct backends along the ring (default 2)
    #[argh(option)]
    pub retries: Option<String>,

    /// most flows open at once in the process; at the limit new clients wait in the kernel backlog
    /// (default: what the open-file limit allows, two descriptors per flow)
    #[argh(option)]
    pub max_conns: Option<String>,

    /// bytes per relay buffer in each worker's buffer ring (default 65536)
    #[argh(option)]
    pub buffer_size: Option<String>,

    /// buffers in each worker's buffer ring, a power of two up to 32768 (default 2048)
    #[argh(option)]
    pub buffers: Option<String>,

    /// selection table for hashing: ring (default, weighted virtual nodes) or maglev
    #[argh(option)]
    pub hash: Option<String>,

    /// size of the Maglev table, rounded up to a prime (default: smallest prime over 100 x backends, at least 65537)
    #[argh(option)]
    pub maglev_table_size: Option<String>,

    /// how flows are spread: hash (default; consistent hashing, session persistence), round-robin, least-conn, random-two
    #[argh(option)]
    pub balance: Option<String>,

    /// consistent hashing with bounded loads: no backend takes more than PCT% of its fair share of active flows (e.g. 125; off by default)
    #[argh(option)]
    pub hash_balance_factor: Option<String>,

    /// enable active health checks: time between TCP connect checks of each backend, with +-10% jitter (default: off, as in HAProxy without `check`; passive checks still run)
    #[argh(option)]
    pub health_interval: Option<String>,

    /// how long one health check may take (default 1s)
    #[argh(option)]
    pub health_timeout: Option<String>,

    /// consecutive successful checks that bring a down backend up (default 2)
    #[argh(option)]
    pub rise: Option<String>,

    /// consecutive failed checks that take an up backend down (default 3)
    #[argh(option)]
    pub fall: Option<String>,

    /// bytes a health check sends after connecting (escapes: \r \n \t \\ \xHH)
    #[argh(option)]
    pub health_send: Option<String>,

    /// bytes the health check's reply must start with (same escapes); without it a connect is enough
    #[argh(option)]
    pub health_expect: Option<String>,

    /// passive checks: this many refused, timed-out or unreachable connects within --fail-timeout take a backend down until a check passes; never every backend at once; 0 disables (default 3)
    #[argh(option)]
    pub max_fails: Option<String>,

    /// window for --max-fails, and how long a passively failed backend stays down when active checks are off (default 10s)
    #[argh(option)]
    pub fail_timeout: Option<String>,

    /// file of backends, one a line in --backend syntax, # comments; re-read on SIGHUP and when it changes
    #[argh(option)]
    pub backends_file: Option<String>,

    /// a DNS name whose A/AAAA addresses are backends, as NAME:PORT; re-resolved every --dns-refresh; repeatable
    #[argh(option)]
    pub backend_dns: Vec<String>,

    /// a DNS name whose SRV records are backends (port and weight from each record; the lowest priority serves, higher ones are backups), e.g. _http._tcp.web.internal; re-resolved every --dns-refresh; repeatable
    #[argh(option)]
    pub backend_dns_srv: Vec<String>,

    /// how often --backend-dns names are resolved again (default 5s)
    #[argh(option)]
    pub dns_refresh: Option<String>,

    /// DNS server for --backend-dns as IP:PORT (default: the first nameserver in /etc/resolv.conf)
    #[argh(option)]
    pub dns_server: Option<String>,

    /// how long flows on a removed backend may continue before they are closed; 0 = until they end (default 0)
    #[argh(option)]
    pub drain_timeout: Option<String>,

    /// on SIGTERM/SIGINT, how long live flows may finish before the rest are closed (default 10s); a second signal closes at once
    #[argh(option)]
    pub shutdown_timeout: Option<String>,

    /// on SIGTERM/SIGINT, GET /ready turns 503 at once but the listeners keep accepting for this long (so the route can be withdrawn first), then the drain starts (default 0)
    #[argh(option)]
    pub drain_delay: Option<String>,

    /// serve GET /metrics (Prometheus) and GET /backends (JSON) on this address, e.g. 127.0.0.1:9000 (off by default)
    #[argh(option)]
    pub admin: Option<String>,

    /// write one JSON line per finished flow to this file, or - for stdout (off by default)
    #[argh(option)]
    pub access_log: Option<String>,

    /// write a PROXY protocol header (v1 or v2) to each backend before any client byte, so the backend sees the real client address
    #[argh(option)]
    pub send_proxy: Option<String>,

    /// read a PROXY protocol header (v1 or v2) from each client first; its address becomes the client for hashing, access lists, limits and logs (needs --trusted-proxy)
    #[argh(switch)]
    pub accept_proxy: bool,

    /// a network (CIDR) of load balancers allowed to send PROXY headers; repeatable
    #[argh(option)]
    pub trusted_proxy: Vec<String>,

    /// how long a client may take to send its whole PROXY header (default 3s)
    #[argh(option)]
    pub proxy_header_timeout: Option<String>,

    /// clients allowed to connect, as CIDR; repeatable; with any --allow, everything else is denied (longest prefix wins)
    #[argh(option)]
    pub allow: Vec<String>,

    /// clients refused at accept, as CIDR; repeatable (longest prefix wins; deny wins a tie)
    #[argh(option)]
    pub deny: Vec<String>,

    /// most flows open at once from one client IP; more are closed at accept (off by default)
    #[argh(option)]
    pub max_conns_per_source: Option<String>,

    /// TCP keepalive on both sides as IDLE,INTERVAL,COUNT, e.g. 60s,10s,5 (off by default)
    #[argh(option)]
    pub tcp_keepalive: Option<String>,

    /// disable TCP_NODELAY (on by default on both sides, so small writes are not delayed)
    #[argh(switch)]
    pub no_tcp_nodelay: bool,

    /// length of each listener's accept queue (default 4096; the kernel caps it at net.core.somaxconn)
    #[argh(option)]
    pub listen_backlog: Option<String>,

    /// TCP Fast Open on the listener: how many Fast Open requests may wait (e.g. 256), so a returning client's first bytes ride in its SYN; needs net.ipv4.tcp_fastopen bit 2; 0 = off (default)
    #[argh(option)]
    pub tcp_fastopen: Option<String>,

    /// TCP Fast Open toward backends (TCP_FASTOPEN_CONNECT): with a cookie cached, the client's first bytes go in the backend SYN; only for protocols where the client speaks first (docs/operations.md); default off
    #[argh(switch)]
    pub backend_fastopen: bool,

    /// local address for backend connections; repeatable, used in turn, so one backend can take more than ~60k flows (IP_BIND_ADDRESS_NO_PORT)
    #[argh(option)]
    pub source: Vec<String>,

    /// print the backend each client address (IP or IP:PORT) maps to, without listening, and exit; repeatable
    #[argh(option)]
    pub show_mapping: Vec<String>,

    /// print the version and exit
    #[argh(switch)]
    pub version: bool,

    /// a Unix socket where this process waits for its successor (created 0600; same uid or root only); see --takeover
    #[argh(option)]
    pub upgrade_socket: Option<String>,

    /// take the listeners and every live flow over from the process at --upgrade-socket instead of binding (exit 1 if none is there)
    #[argh(switch)]
    pub takeover: bool,

    /// auto (default): a direction that proves bulk relays through a kernel pipe with splice(2), without copying bytes through user space; off: always through relay buffers (also RINGWAY_SPLICE=off)
    #[argh(option)]
    pub splice: Option<String>,
}

/// One backend as configured. `name` is its identity for hashing: the address text exactly as
/// written, so the mapping does not depend on list order or on what a hostname resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub backup: bool,
    /// Port the health check connects to, when it is not the traffic port.
    pub check_port: Option<u16>,
}

/// How new flows are spread over backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Consistent hashing of the flow key: a client keeps its backend.
    Hash,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Fewest active flows per unit of weight, counted across all workers.
    LeastConn,
    /// Two weighted random picks, the one with fewer active flows per weight wins.
    RandomTwo,
}

/// Active and passive health checking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// `None`: no active checks.
    pub interval: Option<Duration>,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
    /// `0`: no passive checks.
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

/// Validated configuration. Every field has a value; defaults are applied here.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub backends: Vec<BackendSpec>,
    /// `None`: one worker per CPU in the affinity mask (decided at start-up).
    pub workers: Option<usize>,
    pub hash_key: HashKey,
    pub vnodes: u32,
    pub hash_seed: u64,
    pub connect_timeout: Duration,
    /// `None`: flows are never closed for being idle.
    pub idle_timeout: Option<Duration>,
    pub retries: u32,
    /// `None`: derived from the open-file limit at start-up.
    pub max_conns: Option<usize>,
    pub buffer_size: u32,
    pub buffers: u16,
    pub algorithm: Algorithm,
    pub maglev_table_size: Option<u64>,
    pub balance: Balance,
    /// `None`: no load bound.
    pub hash_balance_factor: Option<u32>,
    pub health: HealthConfig,
    /// Client addresses to print the mapping of (and exit) instead of serving.
    pub show_mapping: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// A path, or "-" for stdout.
    pub access_log: Option<String>,
    pub backends_file: Option<std::path::PathBuf>,
    pub backend_dns: Vec<DnsTarget>,
    pub backend_dns_srv: Vec<SrvName>,
    pub dns_refresh: Duration,
    /// `None`: the system's nameserver.
    pub dns_server: Option<SocketAddr>,
    /// `None`: flows on removed backends run until they end.
    pub drain_timeout: Option<Duration>,
    pub shutdown_timeout: Duration,
    /// Time between the first stop signal (`/ready` turns 503) and closing the listeners.
    pub drain_delay: Duration,
    pub edge: EdgeConfig,
    /// `--upgrade-socket`: where this process waits for its successor.
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// `--takeover`: receive listeners and flows from the process at `upgrade_socket`.
    pub takeover: bool,
    /// `--splice auto`: bulk directions relay through kernel pipes.
    pub splice: bool,
}

/// PROXY protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// TCP keepalive probes: idle time before the first, interval, probes before giving up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// What faces the internet: PROXY protocol, access lists, per-source limits, socket options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeConfig {
    pub send_proxy: Option<ProxyVersion>,
    pub accept_proxy: bool,
    pub trusted_proxies: Vec<Cidr>,
    pub proxy_header_timeout: Duration,
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub max_conns_per_source: Option<u32>,
    pub keepalive: Option<Keepalive>,
    pub nodelay: bool,
    pub listen_backlog: i32,
    pub sources: Vec<std::net::IpAddr>,
    /// TCP_FASTOPEN queue length on listeners; `None`: off.
    pub tcp_fastopen: Option<u32>,
    /// TCP_FASTOPEN_CONNECT on backend sockets.
    pub backend_fastopen: bool,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            send_proxy: None,
            accept_proxy: false,
            trusted_proxies: Vec::new(),
            proxy_header_timeout: Duration::from_secs(3),
            allow: Vec::new(),
            deny: Vec::new(),
            max_conns_per_source: None,
            keepalive: None,
            nodelay: true,
            listen_backlog: 4096,
            sources: Vec::new(),
            tcp_fastopen: None,
            backend_fastopen: false,
        }
    }
}

fn edge_from_flags(flags: &Flags) -> Result<EdgeConfig, FlagError> {
    let cidrs = |flag: &'static str, list: &[String]| {
        list.iter()
            .map(|text| {
                text.parse::<Cidr>()
                    .map_err(|e| flag_error(flag, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let send_proxy = match flags.send_proxy.as_deref() {
        None => None,
        Some("v1") => Some(ProxyVersion::V1),
        Some("v2") => Some(ProxyVersion::V2),
        Some(other) => {
            return Err(flag_error(
                "--send-proxy",
                format!("'{other}' is not one of v1, v2"),
            ))
        }
    };
    let trusted_proxies = cidrs("--trusted-proxy", &flags.trusted_proxy)?;
    if flags.accept_proxy && trusted_proxies.is_empty() {
        return Err(flag_error(
            "--accept-proxy",
            "needs at least one --trusted-proxy CIDR (whose PROXY headers to believe)",
        ));
    }
    let proxy_header_timeout = match &flags.proxy_header_timeout {
        None => Duration::from_secs(3),
        Some(text) => match parse_duration(text) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                return Err(flag_error(
                    "--proxy-header-timeout",
                    "must be greater than 0",
                ))
            }
            Err(m) => return Err(flag_error("--proxy-header-timeout", m)),
        },
    };
    let max_conns_per_source = match &flags.max_conns_per_source {
        None => None,
        Some(text) => Some(parse_in_range("--max-conns-per-source", text, 1, 1_000_000)? as u32),
    };
    let keepalive = match &flags.tcp_keepalive {
        None => None,
        Some(text) => Some(parse_keepalive(text).map_err(|m| flag_error("--tcp-keepalive", m))?),
    };
    let listen_backlog = match &flags.listen_backlog {
        None => 4096,
        Some(text) => parse_in_range("--listen-backlog", text, 1, 1 << 20)? as i32,
    };
    let sources = flags
        .source
        .iter()
        .map(|text| {
            text.parse::<std::net::IpAddr>()
                .map_err(|_| flag_error("--source", format!("'{text}' is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tcp_fastopen = match &flags.tcp_fastopen {
        None => None,
        Some(text) => match parse_in_range("--tcp-fastopen", text, 0, 1 << 20)? {
            0 => None,
            queue => Some(queue as u32),
        },
    };
    Ok(EdgeConfig {
        send_proxy,
        accept_proxy: flags.accept_proxy,
        trusted_proxies,
        proxy_header_timeout,
        allow: cidrs("--allow", &flags.allow)?,
        deny: cidrs("--deny", &flags.deny)?,
        max_conns_per_source,
        keepalive,
        nodelay: !flags.no_tcp_nodelay,
        listen_backlog,
        sources,
        tcp_fastopen,
        backend_fastopen: flags.backend_fastopen,
    })
}

/// `IDLE,INTERVAL,COUNT`, e.g. `60s,10s,5`.
fn parse_keepalive(text: &str) -> Result<Keepalive, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [idle, interval, count] = parts[..] else {
        return Err(format!(
            "'{text}' is not IDLE,INTERVAL,COUNT (e.g. 60s,10s,5)"
        ));
    };
    let second = |d: Duration| d >= Duration::from_secs(1);
    let idle = parse_duration(idle).ok().filter(|d| second(*d));
    let interval = parse_duration(interval).ok().filter(|d| second(*d));
    let count = count.parse::<u32>().ok().filter(|c| (1..=127).contains(c));
    match (idle, interval, count) {
        (Some(idle), Some(interval), Some(count)) => Ok(Keepalive {
            idle,
            interval,
            count,
        }),
        _ => Err(format!(
            "'{text}': IDLE and INTERVAL must be durations of at least 1s and COUNT 1 to 127"
        )),
    }
}

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_RETRIES: u32 = 2;
/// 64 KiB: loopback and LAN bursts arrive in up to 64 KiB segments, so one recv and one send
/// carry a whole segment. Measured on bulk streams: about 30 CPU ticks per GB against 48 with
/// 16 KiB buffers (HAProxy with its 16 KiB bufsize: 39), see docs/architecture.md. Small messages
/// touch only the first page of a buffer, so request/response traffic costs no more memory.
pub const DEFAULT_BUFFER_SIZE: u32 = 64 * 1024;
/// 2048 x 64 KiB = 128 MiB of buffer address space per worker, touched only as traffic needs
/// it (the ring is fed from a LIFO stack, so light traffic reuses a few hot buffers).
pub const DEFAULT_BUFFERS: u16 = 2048;
/// The retry walk remembers tried backends in a small fixed array per flow.
pub const MAX_RETRIES: u32 = 16;

/// A configuration mistake: which flag, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagError {
    pub flag: &'static str,
    pub message: String,
}

impl fmt::Display for FlagError {
    /// Always one line: a value quoted in the message may itself hold line breaks.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.message.replace('\n', "\\n").replace('\r', "\\r");
        write!(f, "{}: {message}", self.flag)
    }
}

impl std::error::Error for FlagError {}

fn flag_error(flag: &'static str, message: impl Into<String>) -> FlagError {
    FlagError {
        flag,
        message: message.into(),
    }
}

impl Config {
    pub fn from_flags(flags: &Flags) -> Result<Config, FlagError> {
        let show_mapping = flags
            .show_mapping
            .iter()
            .map(|text| parse_client_address(text).map_err(|m| flag_error("--show-mapping", m)))
            .collect::<Result<Vec<_>, _>>()?;
        if !show_mapping.is_empty() && flags.balance.as_deref().is_some_and(|b| b != "hash") {
            return Err(flag_error(
                "--show-mapping",
                "only --balance hash pins a client to a backend; other modes have no mapping to show",
            ));
        }
        let listen_text = match (flags.listen.as_deref(), show_mapping.is_empty()) {
            (Some(text), _) => text,
            // Showing the mapping needs no listener.
            (None, false) => "127.0.0.1:0",
            (None, true) => {
                return Err(flag_error(
                    "--listen",
                    "is required (e.g. --listen 0.0.0.0:8080)",
                ))
            }
        };
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            flag_error(
                "--listen",
                format!(
                    "'{listen_text}' is not an IP:PORT address (e.g. 0.0.0.0:8080 or [::]:8080)"
                ),
            )
        })?;

        if flags.backend.is_empty()
            && flags.backends_file.is_none()
            && flags.backend_dns.is_empty()
            && flags.backend_dns_srv.is_empty()
        {
            return Err(flag_error(
                "--backend",
                "at least one is required (e.g. --backend 10.0.0.11:80), or --backends-file, --backend-dns or --backend-dns-srv",
            ));
        }
        let backends = flags
            .backend
            .iter()
            .map(|text| parse_backend(text).map_err(|m| flag_error("--backend", m)))
            .collect::<Result<Vec<_>, _>>()?;
        check_unique_names(&backends)?;
        if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
            return Err(flag_error("--backend", "every backend has weight 0"));
        }

        let workers = match &flags.workers {
            None => None,
            Some(text) => Some(parse_in_range("--workers", text, 1, 1024)? as usize),
        };
        let hash_key = match flags.hash_key.as_deref() {
            None | Some("src-ip") => HashKey::SrcIp,
            Some("src-ip-port") => HashKey::SrcIpPort,
            Some(other) => {
                return Err(flag_error(
                    "--hash-key",
                    format!("'{other}' is not one of src-ip, src-ip-port"),
                ))
            }
        };
        let vnodes = match &flags.vnodes {
            None => DEFAULT_VNODES,
            Some(text) => parse_in_range("--vnodes", text, 1, 100_000)? as u32,
        };
        let hash_seed = match &flags.hash_seed {
            None => 0,
            Some(text) => text.parse::<u64>().map_err(|_| {
                flag_error(
                    "--hash-seed",
                    format!("'{text}' is not an unsigned integer"),
                )
            })?,
        };
        let connect_timeout = match &flags.connect_timeout {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(text) => match parse_duration(text) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => return Err(flag_error("--connect-timeout", "must be greater than 0")),
                Err(m) => return Err(flag_error("--connect-timeout", m)),
            },
        };
        let idle_timeout = match &flags.idle_timeout {
            None => Some(DEFAULT_IDLE_TIMEOUT),
            Some(text) => {
                let d = parse_duration(text).map_err(|m| flag_error("--idle-timeout", m))?;
                (!d.is_zero()).then_some(d)
            }
        };
        let retries = match &flags.retries {
            None => DEFAULT_RETRIES,
            Some(text) => parse_in_range("--retries", text, 0, MAX_RETRIES as u64)? as u32,
        };
        let max_conns = match &flags.max_conns {
            None => None,
            Some(text) => Some(parse_in_range("--max-conns", text, 1, 100_000_000)? as usize),
        };
        let splice = match flags.splice.as_deref() {
            None | Some("auto") => true,
            Some("off") => false,
            Some(other) => {
                return Err(flag_error(
                    "--splice",
                    format!("'{other}' is not one of auto, off"),
                ))
            }
        };
        let buffer_size = match &flags.buffer_size {
            None => DEFAULT_BUFFER_SIZE,
            Some(text) => parse_in_range("--buffer-size", text, 512, 1 << 20)? as u32,
        };
        let buffers = match &flags.buffers {
            None => DEFAULT_BUFFERS,
            Some(text) => {
                let n = parse_in_range("--buffers", text, 16, 32768)?;
                if !n.is_power_of_two() {
                    return Err(flag_error(
                        "--buffers",
                        format!("{n} is not a power of two (the kernel's buffer ring needs one)"),
                    ));
                }
                n as u16
            }
        };

        let algorithm = match flags.hash.as_deref() {
            None | Some("ring") => Algorithm::Ring,
            Some("maglev") => Algorithm::Maglev,
            Some(other) => {
                return Err(flag_error(
                    "--hash",
                    format!("'{other}' is not one of ring, maglev"),
                ))
            }
        };
        let maglev_table_size = match &flags.maglev_table_size {
            None => None,
            Some(text) => Some(parse_in_range("--maglev-table-size", text, 1, 1 << 24)?),
        };
        let balance = match flags.balance.as_deref() {
            None | Some("hash") => Balance::Hash,
            Some("round-robin") => Balance::RoundRobin,
            Some("least-conn") => Balance::LeastConn,
            Some("random-two") => Balance::RandomTwo,
            Some(other) => {
                return Err(flag_error(
                    "--balance",
                    format!("'{other}' is not one of hash, round-robin, least-conn, random-two"),
                ))
            }
        };
        let hash_balance_factor = match &flags.hash_balance_factor {
            None => None,
            Some(text) => Some(parse_in_range("--hash-balance-factor", text, 100, 10_000)? as u32),
        };
        let health = health_from_flags(flags)?;
        let admin = match &flags.admin {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                flag_error(
                    "--admin",
                    format!("'{text}' is not an IP:PORT address (e.g. 127.0.0.1:9000)"),
                )
            })?),
        };
        let backend_dns = flags
            .backend_dns
            .iter()
            .map(|text| {
                text.parse::<DnsTarget>()
                    .map_err(|e| flag_error("--backend-dns", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let backend_dns_srv = flags
            .backend_dns_srv
            .iter()
            .map(|text| {
                text.parse::<SrvName>()
                    .map_err(|e| flag_error("--backend-dns-srv", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let optional_duration = |flag: &'static str, value: &Option<String>| match value {
            None => Ok(None),
            Some(text) => parse_duration(text)
                .map(|d| (!d.is_zero()).then_some(d))
                .map_err(|m| flag_error(flag, m)),
        };
        let dns_refresh = optional_duration("--dns-refresh", &flags.dns_refresh)?
            .unwrap_or(Duration::from_secs(5));
        let dns_server = match &flags.dns_server {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                flag_error(
                    "--dns-server",
                    format!("'{text}' is not an IP:PORT address"),
                )
            })?),
        };
        let drain_timeout = optional_duration("--drain-timeout", &flags.drain_timeout)?;
        let shutdown_timeout = match &flags.shutdown_timeout {
            None => Duration::from_secs(10),
            Some(text) => parse_duration(text).map_err(|m| flag_error("--shutdown-timeout", m))?,
        };
        let drain_delay =
            optional_duration("--drain-delay", &flags.drain_delay)?.unwrap_or(Duration::ZERO);
        let edge = edge_from_flags(flags)?;
        let upgrade_socket = match flags.upgrade_socket.as_deref() {
            Some("") => return Err(flag_error("--upgrade-socket", "needs a path")),
            other => other.map(std::path::PathBuf::from),
        };
        if flags.takeover && upgrade_socket.is_none() {
            return Err(flag_error(
                "--takeover",
                "needs --upgrade-socket PATH (where the running process waits)",
            ));
        }
        let access_log = match flags.access_log.as_deref() {
            Some("") => return Err(flag_error("--access-log", "needs a path or - for stdout")),
            other => other.map(str::to_string),
        };

        Ok(Config {
            listen,
            backends,
            workers,
            hash_key,
            vnodes,
            hash_seed,
            connect_timeout,
            idle_timeout,
            retries,
            max_conns,
            buffer_size,
            buffers,
            algorithm,
            maglev_table_size,
            balance,
            hash_balance_factor,
            health,
            show_mapping,
            admin,
            access_log,
            backends_file: flags.backends_file.as_ref().map(std::path::PathBuf::from),
            backend_dns,
            backend_dns_srv,
            dns_refresh,
            dns_server,
            drain_timeout,
            shutdown_timeout,
            drain_delay,
            edge,
            upgrade_socket,
            takeover: flags.takeover,
            splice,
        })
    }
}

fn health_from_flags(flags: &Flags) -> Result<HealthConfig, FlagError> {
    let duration = |flag: &'static str, value: &Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(text) => parse_duration(text).map_err(|m| flag_error(flag, m)),
    };
    // Off by default: a connect-and-close probe is noise in many servers' logs (PostgreSQL,
    // SSH) and operators opt in, as with HAProxy's `check`. Passive checks are always on.
    let interval = duration("--health-interval", &flags.health_interval, Duration::ZERO)?;
    let timeout = duration(
        "--health-timeout",
        &flags.health_timeout,
        Duration::from_secs(1),
    )?;
    if timeout.is_zero() {
        return Err(flag_error("--health-timeout", "must be greater than 0"));
    }
    let count = |flag: &'static str, value: &Option<String>, default: u64, min: u64| match value {
        None => Ok(default as u32),
        Some(text) => parse_in_range(flag, text, min, 1000).map(|n| n as u32),
    };
    let fail_timeout = duration(
        "--fail-timeout",
        &flags.fail_timeout,
        Duration::from_secs(10),
    )?;
    if fail_timeout.is_zero() {
        return Err(flag_error("--fail-timeout", "must be greater than 0"));
    }
    Ok(HealthConfig {
        interval: (!interval.is_zero()).then_some(interval),
        timeout,
        rise: count("--rise", &flags.rise, 2, 1)?,
        fall: count("--fall", &flags.fall, 3, 1)?,
        send: match &flags.health_send {
            None => Vec::new(),
            Some(text) => unescape(text).map_err(|m| flag_error("--health-send", m))?,
        },
        expect: match &flags.health_expect {
            None => Vec::new(),
            Some(text) => unescape(text).map_err(|m| flag_error("--health-expect", m))?,
        },
        max_fails: count("--max-fails", &flags.max_fails, 3, 0)?,
        fail_timeout,
    })
}

/// Decodes `\r`, `\n`, `\t`, `\\` and `\xHH` so binary probes fit on a command line.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let value = std::str::from_utf8(&hex)
                    .ok()
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("'{text}': \\x needs two hex digits"))?;
                out.push(value);
            }
            _ => {
                return Err(format!(
                    "'{text}': unknown escape (use \\r \\n \\t \\\\ \\xHH)"
                ))
            }
        }
    }
    Ok(out)
}

/// A client address for `--show-mapping`: an IP (port 0) or IP:PORT.
fn parse_client_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("'{text}' is not an IP address or IP:PORT"))
}

fn parse_in_range(flag: &'static str, text: &str, min: u64, max: u64) -> Result<u64, FlagError> {
    let n: u64 = text
        .parse()
        .map_err(|_| flag_error(flag, format!("'{text}' is not an unsigned integer")))?;
    if n < min || n > max {
        return Err(flag_error(
            flag,
            format!("{n} is out of range ({min} to {max})"),
        ));
    }
    Ok(n)
}

fn check_unique_names(backends: &[BackendSpec]) -> Result<(), FlagError> {
    let mut names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(flag_error(
            "--backend",
            format!(
                "'{}' is given twice (use weight=N to give it more traffic)",
                w[0]
            ),
        )),
        None => Ok(()),
    }
}

/// Parses `HOST:PORT[,weight=N][,backup]`. HOST may be an IPv4 address, a bracketed IPv6
/// address or a hostname (resolved at start-up).
pub fn parse_backend(text: &str) -> Result<BackendSpec, String> {
    let mut parts = text.split(',');
    let address = parts.next().unwrap_or_default().trim();
    let (host, port) = split_host_port(address)
        .ok_or_else(|| format!("'{text}' is not HOST:PORT[,weight=N][,backup][,check-port=N]"))?;
    let mut weight = 1u32;
    let mut backup = false;
    let mut check_port = None;
    for option in parts {
        let option = option.trim();
        if option == "backup" {
            backup = true;
        } else if let Some(value) = option.strip_prefix("check-port=") {
            let port = value.parse::<u16>().ok().filter(|p| *p != 0);
            check_port =
                Some(port.ok_or_else(|| format!("'{text}': check-port must be from 1 to 65535"))?);
        } else if let Some(value) = option.strip_prefix("weight=") {
            weight = value
                .parse::<u32>()
                .ok()
                .filter(|w| *w <= 10_000)
                .ok_or_else(|| format!("'{text}': weight must be an integer from 0 to 10000"))?;
        } else {
            return Err(format!(
                "'{text}': unknown option '{option}' (known: weight=N, backup, check-port=N)"
            ));
        }
    }
    Ok(BackendSpec {
        name: address.to_string(),
        host: host.to_string(),
        port,
        weight,
        backup,
        check_port,
    })
}

fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':')?)
    } else {
        let (host, port) = address.rsplit_once(':')?;
        if host.contains(':') {
            return None; // unbracketed IPv6 is ambiguous
        }
        (host, port)
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    host_ok.then_some((host, port))
}

/// Parses `500ms`, `3s`, `10m`, `1h`, or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("'{text}' has no unit (use ms, s, m or h, e.g. 3s)"))?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 500ms, 3s, 10m or 1h"))?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "'{text}' has an unknown unit '{unit}' (use ms, s, m or h)"
            ))
        }
    };
    value
        .checked_mul(millis_per_unit)
        .filter(|ms| *ms <= 7 * 24 * 3_600_000)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("'{text}' is longer than a week"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(listen: &str, backends: &[&str]) -> Flags {
        Flags {
            listen: Some(listen.into()),
            backend: backends.iter().map(|s| s.to_string()).collect(),
            ..Flags::default()
        }
    }

    #[test]
    fn defaults_are_applied() {
        let c = Config::from_flags(&flags("127.0.0.1:8080", &["10.0.0.1:80"])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.hash_key, HashKey::SrcIp);
        assert_eq!(c.vnodes, DEFAULT_VNODES);
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.retries, 2);
        assert_eq!(c.buffers, 2048);
        assert_eq!(c.buffer_size, 65536);
        assert_eq!(c.workers, None);
        assert_eq!(c.max_conns, None);
    }

    #[test]
    fn backend_forms() {
        let b = parse_backend("10.0.0.12:80,weight=2").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.weight, b.backup),
            ("10.0.0.12", 80, 2, false)
        );
        assert_eq!(b.name, "10.0.0.12:80");
        let b = parse_backend("[::1]:9000,backup").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.backup), ("::1", 9000, true));
        assert_eq!(b.name, "[::1]:9000");
        let b = parse_backend("db-1.example.com:5432").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("db-1.example.com", 5432));
        for bad in [
            "nonsense",
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:99999",
            ":80",
            "::1:80",
            "10.0.0.1:80,weight=x",
            "10.0.0.1:80,weight=-1",
            "10.0.0.1:80,color=red",
            "[::1]80",
            "a b:80",
        ] {
            assert!(parse_backend(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&str, Flags)] = &[
            (
                "--listen",
                Flags {
                    backend: vec!["1.2.3.4:5".into()],
                    ..Flags::default()
                },
            ),
            ("--listen", flags("localhost", &["1.2.3.4:5"])),
            ("--backend", flags("0.0.0.0:1", &[])),
            ("--backend", flags("0.0.0.0:1", &["nonsense"])),
            ("--backend", flags("0.0.0.0:1", &["1.2.3.4:5", "1.2.3.4:5"])),
            ("--backend", flags("0.0.0.0:1", &["1.2.3.4:5,weight=0"])),
            (
                "--workers",
                Flags {
                    workers: Some("0".into()),
                    ..flags("0.0.0.0:1", &["1.2.3.4:5"])
                },
            ),
            (
                "--hash-key",
                Flags {
                    hash_key: Some("dst".into()),
                    ..flags("0.0.0.0:1", &["1.2.3.4:5"])
                },
            ),
            (
                "--idle-timeout",
                Flags {
                    idle_timeout: Some("5parsecs".into()),
                    ..flags("0.0.0.0:1", &["1.2.3.4:5"])
                },
            ),
            (
                "--connect-timeout",
                Flags {
                    connect_timeout: Some("0".into()),
                    ..flags("0.0.0.0:1", &["1.2.3.4:5"])
                },
            ),
            (
                "--buffers",
                Flags {
                    buffers: Some("1000".into()),
                    ..flags("0.0.0.0:1", &["1.2.3.4:5"])
                },
            ),
            (
                "--retries",
                Flags {
                    retries: Some("100".into()),
                    ..flags("0.0.0.0:1", &["1.2.3.4:5"])
                },
            ),
        ];
        for (flag, f) in cases {
            let err = Config::from_flags(f).unwrap_err();
            assert_eq!(err.flag, *flag, "{f:?} gave {err}");
            assert!(err.to_string().starts_with(flag));
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "5parsecs", "s", "-1s", "1.5s", "99999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
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

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    /// Every long flag, from argh's own `--help` text, so that new flags are generated too.
    fn flag_names() -> Vec<String> {
        let help = Flags::from_args(&["ringway"], &["--help"]).unwrap_err();
        let names: Vec<String> = help
            .output
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|word| word.starts_with("--"))
            .map(|word| word.trim_end_matches(',').to_string())
            .collect();
        assert!(names.len() > 30, "flags from --help: {names:?}");
        names
    }

    /// What the fuzz target fuzz/fuzz_targets/flags.rs checks: no panic; an argh failure is
    /// argh's own message; a `from_flags` error is one line led by the flag it names.
    fn check_invariants(args: &[&str]) -> bool {
        let Ok(flags) = Flags::from_args(&["ringway"], args) else {
            return false;
        };
        match Config::from_flags(&flags) {
            Ok(_) => true,
            Err(error) => {
                let message = error.to_string();
                assert!(
                    error.flag.starts_with("--") && message.starts_with(error.flag),
                    "{args:?} gave an error not led by its flag: {message:?}"
                );
                assert!(!message.contains('\n'), "{args:?} gave {message:?}");
                false
            }
        }
    }

    #[test]
    fn flag_errors_hold_for_generated_command_lines() {
        const VALUES: &[&str] = &[
            "0",
            "1",
            "2",
            "-1",
            "65535",
            "65536",
            "4294967296",
            "18446744073709551616",
            "0s",
            "500ms",
            "3s",
            "10m",
            "1h",
            "99999999999h",
            "1.5s",
            "127.0.0.1:0",
            "[::]:80",
            "10.0.0.1:80",
            "10.0.0.1:80,weight=0",
            "10.0.0.2:80,backup",
            "10.0.0.3:80,check-port=81",
            "10.0.0.1",
            "svc.test:80",
            "127.0.0.1:53",
            "10.0.0.0/8",
            "::/0",
            "1.2.3.4/33",
            "src-ip",
            "src-ip-port",
            "ring",
            "maglev",
            "hash",
            "round-robin",
            "least-conn",
            "random-two",
            "v1",
            "v2",
            "-",
            "",
            " ",
            "é",
            "--",
            "PING",
        ];
        let names = flag_names();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut configs = 0;
        for _ in 0..4000 {
            let mut args: Vec<String> = Vec::new();
            // Most command lines start valid, so that validation goes past the first flags.
            if rng.below(4) != 0 {
                args.extend(
                    ["--listen", "127.0.0.1:0", "--backend", "10.0.0.1:80"].map(String::from),
                );
            }
            while args.len() < 40 && rng.below(6) != 0 {
                match rng.below(8) {
                    0 => args.push(rng.pick(VALUES).to_string()),
                    1 => args.push(
                        (0..rng.below(6))
                            .map(|_| char::from(32 + rng.below(95) as u8))
                            .collect(),
                    ),
                    _ => {
                        args.push(names[rng.below(names.len())].clone());
                        args.push(rng.pick(VALUES).to_string());
                    }
                }
            }
            args.truncate(40);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            configs += usize::from(check_invariants(&args));
        }
        // The generator must reach both sides for the test to mean something.
        assert!(
            (200..3800).contains(&configs),
            "{configs} of 4000 were configs"
        );
    }

    #[test]
    fn idle_timeout_zero_disables() {
        let f = Flags {
            idle_timeout: Some("0".into()),
            ..flags("[::]:80", &["[::1]:81"])
        };
        assert_eq!(Config::from_flags(&f).unwrap().idle_timeout, None);
    }
}
