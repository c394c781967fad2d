//! ringway-load: test backends (`serve`) and load workloads (`rr`, `connect`, `bulk`, `idle`).
//! Run `ringway-load help` or `ringway-load <command> --help`.

use argh::FromArgs;
use ringway_load::bulk::{self, BulkConfig, Direction};
use ringway_load::duration::from_arg as dur;
use ringway_load::idle::{self, IdleConfig};
use ringway_load::rr::{self, RrConfig, RrResult};
use ringway_load::server::{self, Mode, ServeConfig};
use ringway_load::soak;
use ringway_load::sources::parse_sources;
use ringway_load::stats::{
    errors_line, json_latency_and_errors, latency_line, round3, unfinished_line, Json,
};
use ringway_load::{connect, Common};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(FromArgs)]
/// Load generator and test backends for benchmarking TCP proxies on loopback.
struct Cli {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Serve(ServeArgs),
    Rr(RrArgs),
    Connect(ConnectArgs),
    Bulk(BulkArgs),
    Idle(IdleArgs),
    Probe(ProbeArgs),
    SoakServe(SoakServeArgs),
    Soak(SoakArgs),
}

#[derive(FromArgs)]
/// Soak backend: greets with its name, then serves echo/download/upload/half-close/reset
/// commands (see the `soak` module). Prints "listening on ADDR mode=soak name=NAME" once ready.
#[argh(subcommand, name = "soak-serve")]
struct SoakServeArgs {
    /// address to listen on
    #[argh(option)]
    listen: SocketAddr,
    /// name sent as the greeting (default: the address)
    #[argh(option)]
    name: Option<String>,
    /// stop after this long (default: until SIGTERM/SIGINT)
    #[argh(option, from_str_fn(dur))]
    duration: Option<Duration>,
}

#[derive(FromArgs)]
/// Chaos soak client: mixed self-checking load through a proxy to soak-serve backends, with
/// resource sampling of the proxy and a report; exits non-zero on unexpected errors or growth.
#[argh(subcommand, name = "soak")]
struct SoakArgs {
    /// address of the proxy
    #[argh(option)]
    target: SocketAddr,
    /// how long to run the load (default 60s)
    #[argh(option, default = "Duration::from_secs(60)", from_str_fn(dur))]
    duration: Duration,
    /// requests per second over all request/response connections (default 200)
    #[argh(option, default = "200.0")]
    rate: f64,
    /// persistent request/response connections (default 16)
    #[argh(option, default = "16")]
    rr_conns: usize,
    /// new connections per second per churn thread (default 25)
    #[argh(option, default = "25.0")]
    churn_rate: f64,
    /// churn threads (default 4)
    #[argh(option, default = "4")]
    churn_threads: usize,
    /// bulk threads (default 2)
    #[argh(option, default = "2")]
    bulk_threads: usize,
    /// largest bulk transfer in bytes (default 4 MiB)
    #[argh(option, default = "4 << 20")]
    bulk_max: u64,
    /// client source addresses, one picked at random per connection (default
    /// 127.0.0.2-127.0.0.250 for a loopback target, so flows spread over the backends)
    #[argh(option)]
    sources: Option<String>,
    /// seed of the random sizes and choices (default: from the clock)
    #[argh(option)]
    seed: Option<u64>,
    /// timeout of each connect, read and write (default 10s)
    #[argh(option, default = "Duration::from_secs(10)", from_str_fn(dur))]
    timeout: Duration,
    /// pid of the proxy, to sample its RSS, descriptors and CPU
    #[argh(option)]
    proxy_pid: Option<u32>,
    /// the proxy's admin address, for its flow counters
    #[argh(option)]
    admin: Option<SocketAddr>,
    /// the chaos log ("<unix ms> <event> [<backend>]" lines) that explains expected errors
    #[argh(option)]
    chaos_log: Option<PathBuf>,
    /// the proxy's access log, summarised in the report
    #[argh(option)]
    access_log: Option<PathBuf>,
    /// how often to sample the proxy (default 2s)
    #[argh(option, default = "Duration::from_secs(2)", from_str_fn(dur))]
    sample_every: Duration,
}

#[derive(FromArgs)]
/// Run test backends. Prints "listening on ADDR mode=M name=N" per listener once ready.
#[argh(subcommand, name = "serve")]
struct ServeArgs {
    /// address to listen on (repeatable; port 0 picks a free port)
    #[argh(option)]
    listen: Vec<SocketAddr>,
    /// echo | sink | source | http | hello
    #[argh(option, default = "Mode::Echo")]
    mode: Mode,
    /// backend name for hello mode (repeatable: one per --listen, in order)
    #[argh(option)]
    name: Vec<String>,
    /// threads (each serves every listener; default 1)
    #[argh(option, default = "1")]
    threads: usize,
    /// stop after this long (default: run until killed)
    #[argh(option, from_str_fn(dur))]
    duration: Option<Duration>,
}

#[derive(FromArgs)]
/// Request/response on persistent connections (echo backend).
#[argh(subcommand, name = "rr")]
struct RrArgs {
    /// address to connect to
    #[argh(option)]
    target: SocketAddr,
    /// how long to measure (default 5s)
    #[argh(option, default = "Duration::from_secs(5)", from_str_fn(dur))]
    duration: Duration,
    /// concurrent connections (default 16)
    #[argh(option, default = "16")]
    conns: usize,
    /// load generator threads (default 1)
    #[argh(option, default = "1")]
    threads: usize,
    /// request size in bytes (default 64)
    #[argh(option, default = "64")]
    size: usize,
    /// fixed offered load in requests/s over all connections (default: closed loop)
    #[argh(option)]
    rate: Option<f64>,
    /// timeout for connect and for each reply (default 2s)
    #[argh(option, default = "Duration::from_secs(2)", from_str_fn(dur))]
    timeout: Duration,
    /// client source addresses, e.g. 127.0.0.2-127.0.0.20 (round-robin per connection)
    #[argh(option)]
    sources: Option<String>,
    /// the server greets each connection with one line first (hello backends): skip it
    #[argh(switch)]
    greeting: bool,
    /// print one JSON object instead of text
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// From each source address, connect --times times to hello backends (through a proxy) and
/// print which backend answered; exits non-zero if any attempt failed.
#[argh(subcommand, name = "probe")]
struct ProbeArgs {
    /// address to connect to
    #[argh(option)]
    target: SocketAddr,
    /// client source addresses, e.g. 127.0.0.2-127.0.0.9
    #[argh(option)]
    sources: String,
    /// connections per source address (default 3)
    #[argh(option, default = "3")]
    times: usize,
    /// timeout for each connect and read (default 2s)
    #[argh(option, default = "Duration::from_secs(2)", from_str_fn(dur))]
    timeout: Duration,
}

#[derive(FromArgs)]
/// New connection per exchange: connect, send --size bytes, receive the echo, close.
#[argh(subcommand, name = "connect")]
struct ConnectArgs {
    /// address to connect to
    #[argh(option)]
    target: SocketAddr,
    /// how long to measure (default 5s)
    #[argh(option, default = "Duration::from_secs(5)", from_str_fn(dur))]
    duration: Duration,
    /// concurrent connection attempts (default 16)
    #[argh(option, default = "16")]
    conns: usize,
    /// load generator threads (default 1)
    #[argh(option, default = "1")]
    threads: usize,
    /// bytes sent on each connection (default 64)
    #[argh(option, default = "64")]
    size: usize,
    /// timeout for connect and for the reply (default 2s)
    #[argh(option, default = "Duration::from_secs(2)", from_str_fn(dur))]
    timeout: Duration,
    /// client source addresses, e.g. 127.0.0.2-127.0.0.20
    #[argh(option)]
    sources: Option<String>,
    /// print one JSON object instead of text
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Long streams: up (to a sink backend), down (from a source backend), both (echo backend).
#[argh(subcommand, name = "bulk")]
struct BulkArgs {
    /// address to connect to
    #[argh(option)]
    target: SocketAddr,
    /// how long to stream (default 5s)
    #[argh(option, default = "Duration::from_secs(5)", from_str_fn(dur))]
    duration: Duration,
    /// number of streams (default 1)
    #[argh(option, default = "1")]
    streams: usize,
    /// up | down | both (default down)
    #[argh(option, default = "Direction::Down")]
    direction: Direction,
    /// load generator threads (default 1)
    #[argh(option, default = "1")]
    threads: usize,
    /// connect timeout, and how long the end-of-run drain may take (default 2s)
    #[argh(option, default = "Duration::from_secs(2)", from_str_fn(dur))]
    timeout: Duration,
    /// client source addresses, e.g. 127.0.0.2-127.0.0.20
    #[argh(option)]
    sources: Option<String>,
    /// print one JSON object instead of text
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Open N flows, check each, hold them idle, check each again (echo backend).
#[argh(subcommand, name = "idle")]
struct IdleArgs {
    /// address to connect to
    #[argh(option)]
    target: SocketAddr,
    /// number of flows (default 1000)
    #[argh(option, default = "1000")]
    conns: usize,
    /// client source addresses, e.g. 127.0.0.2-127.0.0.20 (round-robin per flow)
    #[argh(option)]
    sources: Option<String>,
    /// how long to hold the flows idle (default 5s; SIGUSR1 ends the hold early)
    #[argh(option, default = "Duration::from_secs(5)", from_str_fn(dur))]
    hold: Duration,
    /// write the number of open flows to this file once all are open and checked
    #[argh(option)]
    ready_file: Option<PathBuf>,
    /// bytes in each check exchange (default 64)
    #[argh(option, default = "64")]
    size: usize,
    /// timeout for each connect and for the replies of a check round (default 2s)
    #[argh(option, default = "Duration::from_secs(2)", from_str_fn(dur))]
    timeout: Duration,
    /// give up opening flows after this long (default 60s)
    #[argh(option, default = "Duration::from_secs(60)", from_str_fn(dur))]
    open_deadline: Duration,
    /// check exchanges outstanding at once (default 0: all at once; 1: in sequence)
    #[argh(option, default = "0")]
    in_flight: usize,
    /// print one JSON object instead of text
    #[argh(switch)]
    json: bool,
}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringway-load: {e}");
            ExitCode::from(2)
        }
    }
}

fn sources(arg: &Option<String>) -> Result<Vec<IpAddr>, String> {
    match arg {
        Some(text) => parse_sources(text),
        None => Ok(Vec::new()),
    }
}

fn check_common(c: &Common) -> Result<(), String> {
    if c.conns == 0 {
        return Err("--conns/--streams must be at least 1".into());
    }
    if c.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    if c.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    if let Some(ip) = c
        .sources
        .iter()
        .find(|ip| ip.is_ipv4() != c.target.is_ipv4())
    {
        return Err(format!(
            "source {ip} and target {} are not the same address family",
            c.target
        ));
    }
    Ok(())
}

fn run(cmd: Cmd) -> Result<ExitCode, String> {
    match cmd {
        Cmd::Serve(a) => {
            if a.listen.is_empty() {
                return Err("serve needs at least one --listen".into());
            }
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
            }
            let mut names = a.name.into_iter();
            let cfg = ServeConfig {
                listen: a.listen.clone(),
                mode: a.mode,
                names: a.listen.iter().map(|_| names.next()).collect(),
                threads: a.threads,
                duration: a.duration,
            };
            server::serve(cfg, stop).map_err(|e| format!("serve: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rr(a) => {
            let common = Common {
                target: a.target,
                duration: a.duration,
                conns: a.conns,
                threads: a.threads,
                timeout: a.timeout,
                sources: sources(&a.sources)?,
            };
            check_common(&common)?;
            if a.size == 0 {
                return Err("--size must be at least 1".into());
            }
            if let Some(r) = a.rate {
                if !(r > 0.0 && r.is_finite()) {
                    return Err("--rate must be a positive number".into());
                }
            }
            let cfg = RrConfig {
                common,
                size: a.size,
                rate: a.rate,
                reconnect: false,
                greeting: a.greeting,
            };
            let res = rr::run(&cfg);
            Ok(report_rr("rr", &cfg, &res, a.json))
        }
        Cmd::Connect(a) => {
            let common = Common {
                target: a.target,
                duration: a.duration,
                conns: a.conns,
                threads: a.threads,
                timeout: a.timeout,
                sources: sources(&a.sources)?,
            };
            check_common(&common)?;
            if a.size == 0 {
                return Err("--size must be at least 1".into());
            }
            let cfg = RrConfig {
                common: common.clone(),
                size: a.size,
                rate: None,
                reconnect: true,
                greeting: false,
            };
            let res = connect::run(common, a.size);
            Ok(report_rr("connect", &cfg, &res, a.json))
        }
        Cmd::Bulk(a) => {
            let common = Common {
                target: a.target,
                duration: a.duration,
                conns: a.streams,
                threads: a.threads,
                timeout: a.timeout,
                sources: sources(&a.sources)?,
            };
            check_common(&common)?;
            let cfg = BulkConfig {
                common,
                direction: a.direction,
            };
            let res = bulk::run(&cfg);
            let s = &res.stats;
            let dir = format!("{:?}", a.direction).to_lowercase();
            if a.json {
                let mut j = Json::new();
                j.str("workload", "bulk")
                    .str("target", &a.target.to_string())
                    .str("direction", &dir)
                    .int("streams", a.streams as u64)
                    .int("threads", a.threads as u64)
                    .num("elapsed_s", res.elapsed.as_secs_f64())
                    .int("bytes_up", s.bytes_up)
                    .int("bytes_down", s.bytes_down)
                    .num("gbps", res.gbps())
                    .int("streams_ok", res.streams_ok);
                json_latency_and_errors(&mut j, s);
                println!("{}", j.finish());
            } else {
                println!(
                    "bulk {dir} target={} streams={} threads={} elapsed={:.2}s",
                    a.target,
                    a.streams,
                    a.threads,
                    res.elapsed.as_secs_f64()
                );
                println!(
                    "  up {} bytes, down {} bytes: {:.3} Gbit/s; streams ok {}/{}",
                    s.bytes_up,
                    s.bytes_down,
                    res.gbps(),
                    res.streams_ok,
                    a.streams
                );
                println!("  {}", unfinished_line(s));
                println!("  {}", errors_line(s));
            }
            let bad = s.error_total() > 0 || res.streams_ok < a.streams as u64;
            Ok(if bad {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::SoakServe(a) => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
            }
            let name = a.name.unwrap_or_else(|| a.listen.to_string());
            let deadline = a.duration.map(|d| std::time::Instant::now() + d);
            soak::serve(a.listen, name, stop, deadline).map_err(|e| format!("soak-serve: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Soak(a) => {
            if !(a.rate > 0.0 && a.rate.is_finite() && a.churn_rate > 0.0) {
                return Err("--rate and --churn-rate must be positive".into());
            }
            if a.rr_conns == 0 || a.duration.is_zero() || a.sample_every.is_zero() {
                return Err("--rr-conns, --duration and --sample-every must be positive".into());
            }
            let seed = a.seed.unwrap_or_else(soak::unix_ms);
            let cfg = soak::SoakConfig {
                target: a.target,
                duration: a.duration,
                rate: a.rate,
                rr_conns: a.rr_conns,
                churn_rate: a.churn_rate,
                churn_threads: a.churn_threads,
                bulk_threads: a.bulk_threads,
                bulk_max: a.bulk_max,
                sources: match &a.sources {
                    Some(text) => parse_sources(text)?,
                    None if a.target.ip().is_loopback() && a.target.is_ipv4() => {
                        parse_sources("127.0.0.2-127.0.0.250")?
                    }
                    None => Vec::new(),
                },
                seed,
                timeout: a.timeout,
            };
            let checks = soak::SoakChecks {
                proxy_pid: a.proxy_pid,
                admin: a.admin,
                chaos_log: a.chaos_log,
                access_log: a.access_log,
                sample_every: a.sample_every,
            };
            let mut report = String::new();
            let passed = soak::soak(&cfg, &checks, &mut report);
            print!("{report}");
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Probe(a) => {
            let srcs = parse_sources(&a.sources)?;
            if a.times == 0 {
                return Err("--times must be at least 1".into());
            }
            let lines = ringway_load::probe::probe(a.target, &srcs, a.times, a.timeout);
            let mut backends: std::collections::BTreeMap<String, usize> = Default::default();
            for l in &lines {
                let shown: Vec<String> = l
                    .answers
                    .iter()
                    .map(|r| match r {
                        Ok(name) => name.clone(),
                        Err(e) => format!("[{e}]"),
                    })
                    .collect();
                let verdict = if l.consistent() {
                    "same backend every time"
                } else if l.all_ok() {
                    "MOVED between backends"
                } else {
                    "FAILED"
                };
                println!(
                    "client {:<15} -> {}   ({verdict})",
                    l.source,
                    shown.join(", ")
                );
                if let Some(Ok(name)) = l.answers.first() {
                    *backends.entry(name.clone()).or_insert(0) += 1;
                }
            }
            let spread: Vec<String> = backends.iter().map(|(b, n)| format!("{b}: {n}")).collect();
            println!("clients per backend: {}", spread.join(", "));
            let attempts: usize = lines.iter().map(|l| l.answers.len()).sum();
            let answered: usize = lines
                .iter()
                .map(|l| l.answers.iter().filter(|a| a.is_ok()).count())
                .sum();
            let unfinished: usize = lines.iter().map(|l| l.unfinished()).sum();
            println!(
                "attempts: {attempts}, answered {answered}, failed {}; unfinished at the end: {unfinished}{}",
                attempts - answered,
                if unfinished > 0 {
                    " (no answer within --timeout; counted as failed)"
                } else {
                    ""
                }
            );
            let ok = lines.iter().all(|l| l.all_ok());
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Idle(a) => {
            let common = Common {
                target: a.target,
                duration: a.hold.max(Duration::from_millis(1)),
                conns: a.conns,
                threads: 1,
                timeout: a.timeout,
                sources: sources(&a.sources)?,
            };
            check_common(&common)?;
            if a.size == 0 {
                return Err("--size must be at least 1".into());
            }
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGUSR1, stop.clone())
                .map_err(|e| e.to_string())?;
            let cfg = IdleConfig {
                common,
                hold: a.hold,
                ready_file: a.ready_file,
                size: a.size,
                open_deadline: a.open_deadline,
                in_flight: a.in_flight,
            };
            let res = idle::run(&cfg, stop);
            let s = &res.stats;
            if a.json {
                let mut j = Json::new();
                j.str("workload", "idle")
                    .str("target", &a.target.to_string())
                    .int("flows", res.wanted as u64)
                    .int("sources", cfg.common.sources.len() as u64)
                    .int("opened", res.opened as u64)
                    .num("open_s", res.open_secs)
                    .int("first_ok", res.first_ok as u64)
                    .num("held_s", res.held_secs)
                    .int("ok", res.final_ok as u64)
                    .int("failed", res.failed() as u64);
                json_latency_and_errors(&mut j, s);
                println!("{}", j.finish());
            } else {
                println!(
                    "idle target={} flows={} sources={}",
                    a.target,
                    res.wanted,
                    cfg.common.sources.len()
                );
                println!(
                    "  opened {} in {:.2}s, {} answered at once; held {:.2}s; after the hold: ok {}, failed {}",
                    res.opened,
                    res.open_secs,
                    res.first_ok,
                    res.held_secs,
                    res.final_ok,
                    res.failed()
                );
                println!("  check {}", latency_line(s));
                println!("  {}", unfinished_line(s));
                println!("  {}", errors_line(s));
            }
            Ok(if res.failed() > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn report_rr(name: &str, cfg: &RrConfig, res: &RrResult, json: bool) -> ExitCode {
    let s = &res.stats;
    let secs = res.elapsed.as_secs_f64();
    let per_sec = s.ok as f64 / secs;
    let c = &cfg.common;
    if json {
        let mut j = Json::new();
        j.str("workload", name)
            .str("target", &c.target.to_string())
            .int("conns", c.conns as u64)
            .int("threads", c.threads as u64)
            .int("size", cfg.size as u64)
            .int("sources", c.sources.len() as u64)
            .num("duration_s", secs)
            .int("ok", s.ok)
            .num(if name == "connect" { "cps" } else { "rps" }, per_sec)
            .int("connects", res.connects)
            .int("in_flight_at_end", res.in_flight_at_end)
            .int("finished_after_end", res.finished_after_end)
            .num("drain_s", round3(res.drain.as_secs_f64()));
        if let Some(r) = cfg.rate {
            j.num("rate", r).int("late_sends", res.late_sends);
        }
        json_latency_and_errors(&mut j, s);
        println!("{}", j.finish());
    } else {
        let unit = if name == "connect" { "conn/s" } else { "req/s" };
        let rate = cfg.rate.map(|r| format!(" rate={r}/s")).unwrap_or_default();
        println!(
            "{name} target={} conns={} threads={} size={}{rate} duration={secs:.2}s",
            c.target, c.conns, c.threads, cfg.size
        );
        println!(
            "  {} ok, {per_sec:.1} {unit}, {} connects",
            s.ok, res.connects
        );
        if cfg.rate.is_some() {
            println!(
                "  late sends (>1ms after schedule): {} (latency from intended send time)",
                res.late_sends
            );
        }
        println!("  {}", latency_line(s));
        println!(
            "  in flight at the end: {}, finished within --timeout after it: {} (not counted above); {}",
            res.in_flight_at_end,
            res.finished_after_end,
            unfinished_line(s)
        );
        println!("  {}", errors_line(s));
    }
    if s.error_total() > 0 || s.ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
