//! Prometheus metrics (`vpstag daemon --metrics ADDR:PORT`): the figures of every VPS and of the
//! daemon, in the Prometheus text exposition format (version 0.0.4) at `/metrics`.
//!
//! - Per VPS, labelled `vps="NAME"` and `owner="UID"`: `vpstag_vps_processes` (live members),
//!   `vpstag_vps_cpu_seconds_total` (every process that has ever been in it, exited ones
//!   included), `vpstag_vps_memory_bytes` (resident, summed over the members),
//!   `vpstag_vps_forks_total` (processes created in it, threads not counted, since this daemon
//!   knows it). All from [`Manager::usage`](vpstag::Manager::usage), as `vpstag list` shows them.
//!   A forgotten VPS leaves the output.
//! - The daemon: `vpstag_events_total`, `vpstag_events_lost_total`,
//!   `vpstag_event_loss_reports_total`, `vpstag_resyncs_total` (the manager's [`vpstag::Stats`])
//!   and `vpstag_backend_info{backend="..."} 1`.
//!
//! The text is made by the `prometheus-client` crate from a fresh registry per scrape (so a
//! forgotten VPS is simply absent), and served by `hyper` on a single-threaded `tokio` runtime in
//! a thread of its own, `vpstag-metrics`, so a scraper never holds up the event thread or the
//! socket's. A slow or hostile scraper is bounded: at most [`MAX_CONNECTIONS`] connections are
//! served at once (more are closed as soon as they are accepted, costing no task), a request's
//! headers must arrive within [`HEADER_TIMEOUT`] and are at most [`MAX_REQUEST_BYTES`], and every
//! connection is closed [`CONNECTION_DEADLINE`] after it was accepted, reading or not. The
//! figures are computed at most once per [`MIN_INTERVAL`] (one `Manager::list` and one
//! `Manager::usage` per VPS, each reading its members' `/proc/PID/stat`); scrapes in between get
//! the same text, so even a flood of requests costs the manager at most that.
//!
//! Anyone who can connect sees every VPS's name, owner and figures, whoever they belong to: the
//! endpoint listens on loopback unless an address is given explicitly.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use vpstag::Stats;

use super::*;

/// At most this many scrapers are served at once; a connection beyond them is closed as soon as
/// it is accepted.
pub const MAX_CONNECTIONS: usize = 16;
/// A request's headers must arrive whole within this time of the connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Every connection is closed this long after it was accepted, whatever it is doing (a client
/// that sends slowly, or never reads its answer).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The most bytes of a request that are buffered (headers included; hyper's floor is 8 KiB).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// The figures are computed at most once per this interval; a scrape in between gets the text of
/// the last one.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the accept loop looks at the daemon's stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);

/// `--metrics`: `PORT` or `:PORT` (loopback, 127.0.0.1), or `ADDRESS:PORT` with a numeric IPv4
/// address, `[IPv6]`, or `localhost`. Port 0 takes any free port (the daemon logs which).
pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let usage = "give PORT or :PORT (on 127.0.0.1), or ADDRESS:PORT with a numeric IPv4 address, [IPv6] or \
                 localhost (e.g. 9478, 127.0.0.1:9478, [::1]:9478, 0.0.0.0:9478 for every interface)";
    let port = |p: &str| -> Result<u16, String> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{s:?}: {p:?} is not a port number; {usage}"));
        }
        p.parse().map_err(|_| format!("{s:?}: the port must be at most 65535; {usage}"))
    };
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let s_trim = s.trim();
    if let Some(p) = s_trim.strip_prefix(':') {
        return Ok(SocketAddr::new(loopback, port(p)?));
    }
    if !s_trim.contains(':') {
        return Ok(SocketAddr::new(loopback, port(s_trim)?));
    }
    if let Ok(a) = s_trim.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s_trim.rsplit_once(':') {
        Some(("localhost", p)) => Ok(SocketAddr::new(loopback, port(p)?)),
        Some((host, p)) if !host.contains(':') || host.starts_with('[') => {
            port(p)?;
            Err(format!("{s:?}: {host:?} is not a numeric IP address; {usage}"))
        }
        _ => Err(format!("{s:?}: an IPv6 address goes in brackets; {usage}")),
    }
}

/// What is kept between scrapes.
#[derive(Default)]
pub(super) struct Metrics {
    /// The last text served (or why there was none), and when it was made.
    last: Mutex<Option<(Instant, Result<Bytes, String>)>>,
}

/// One VPS's figures, as a scrape found them.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct VpsFigures {
    /// Its name, as its owner gave it.
    pub(super) name: String,
    /// Its owner's uid.
    pub(super) owner: u32,
    /// Live members.
    pub(super) processes: usize,
    /// CPU time, in milliseconds.
    pub(super) cpu_ms: u64,
    /// Resident memory, in bytes.
    pub(super) rss_bytes: u64,
    /// Processes created in it since the daemon knows it.
    pub(super) forks: u64,
}

/// Everything a scrape reports.
#[derive(Clone, Debug)]
pub(super) struct Snapshot {
    pub(super) vpses: Vec<VpsFigures>,
    pub(super) stats: Stats,
    pub(super) backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VpsLabels {
    vps: String,
    owner: String,
}

/// `snap` in the Prometheus text format (version 0.0.4).
pub(super) fn encode(snap: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    let processes = Family::<VpsLabels, Gauge>::default();
    let cpu = Family::<VpsLabels, Counter<f64>>::default();
    let memory = Family::<VpsLabels, Gauge>::default();
    let forks = Family::<VpsLabels, Counter>::default();
    for v in &snap.vpses {
        let l = VpsLabels { vps: v.name.clone(), owner: v.owner.to_string() };
        processes.get_or_create(&l).set(i64::try_from(v.processes).unwrap_or(i64::MAX));
        cpu.get_or_create(&l).inc_by(v.cpu_ms as f64 / 1000.0);
        memory.get_or_create(&l).set(i64::try_from(v.rss_bytes).unwrap_or(i64::MAX));
        forks.get_or_create(&l).inc_by(v.forks);
    }
    reg.register("vpstag_vps_processes", "Live processes (not threads) of the VPS", processes);
    reg.register(
        "vpstag_vps_cpu_seconds",
        "User and system CPU time of every process that has been in the VPS, exited ones included, in seconds",
        cpu,
    );
    reg.register("vpstag_vps_memory_bytes", "Resident memory of the VPS's live processes, summed, in bytes", memory);
    reg.register(
        "vpstag_vps_forks",
        "Processes created in the VPS (fork, vfork, clone of a process; not threads) since the daemon knows it",
        forks,
    );
    let counter = |n: u64| {
        let c: Counter = Counter::default();
        c.inc_by(n);
        c
    };
    reg.register("vpstag_events", "Events the backend delivered and the daemon applied", counter(snap.stats.events));
    reg.register(
        "vpstag_events_lost",
        "Events known lost (where the backend can count them; see vpstag_event_loss_reports_total)",
        counter(snap.stats.lost_events),
    );
    reg.register(
        "vpstag_event_loss_reports",
        "Times the backend reported lost events (each one followed by a resync)",
        counter(snap.stats.loss_reports),
    );
    reg.register(
        "vpstag_resyncs",
        "Resynchronisations of the table from a scan of the system",
        counter(snap.stats.resyncs),
    );
    reg.register(
        "vpstag_backend",
        "The tracking backend in use",
        Info::new(vec![("backend".to_string(), snap.backend.clone())]),
    );
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)?;
    Ok(out)
}

impl Daemon {
    /// The figures now: one [`Manager::list`], then [`Manager::usage`] of each VPS (the figures
    /// `vpstag list` shows).
    fn snapshot(&self) -> Result<Snapshot, Error> {
        let list = self.mgr.list()?;
        let stats = self.mgr.stats();
        let names: Vec<(String, u32)> = {
            let meta = self.meta();
            list.iter()
                .map(|s| match meta.get(&s.vps.id.0) {
                    Some(m) => (m.name.clone(), m.owner),
                    // Not the daemon's own (cannot happen): the manager's key, `uid:name`.
                    None => match s.vps.name.split_once(':') {
                        Some((uid, n)) => (n.to_string(), uid.parse().unwrap_or(0)),
                        None => (s.vps.name.clone(), 0),
                    },
                })
                .collect()
        };
        let mut vpses = Vec::with_capacity(list.len());
        for (s, (name, owner)) in list.iter().zip(names) {
            let u = match self.mgr.usage(&s.vps) {
                Ok(u) => u,
                // Forgotten since the list.
                Err(Error::UnknownVps(_)) => continue,
                Err(e) => return Err(e),
            };
            vpses.push(VpsFigures {
                name,
                owner,
                processes: u.processes,
                cpu_ms: u64::try_from(u.cpu.as_millis()).unwrap_or(u64::MAX),
                rss_bytes: u.memory_bytes,
                forks: u.forks,
            });
        }
        Ok(Snapshot { vpses, stats, backend: self.backend.clone() })
    }

    /// The text of `/metrics`: the last one (or the last failure) when it is younger than
    /// [`MIN_INTERVAL`]. A failure is logged when it happens, so at most once per interval.
    fn metrics_text(&self, m: &Metrics) -> Result<Bytes, String> {
        let mut last = m.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, text)) = last.as_ref() {
            if at.elapsed() < MIN_INTERVAL {
                return text.clone();
            }
        }
        let text = self
            .snapshot()
            .map_err(|e| e.to_string())
            .and_then(|snap| encode(&snap).map_err(|e| format!("encoding the metrics: {e}")))
            .map(Bytes::from);
        if let Err(e) = &text {
            log!("metrics: cannot read the figures: {e}");
        }
        *last = Some((Instant::now(), text.clone()));
        text
    }
}

/// The answer to one request.
fn answer(d: &Daemon, m: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found: vpstag serves its metrics at /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET or HEAD\n".into());
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match d.metrics_text(m) {
        Ok(body) => {
            let mut r = Response::new(Full::new(body));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the figures: {e}\n")),
    }
}

/// The metrics endpoint's socket, bound (so that a port in use stops the daemon at start) but not
/// yet served.
pub(super) struct Endpoint {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl Endpoint {
    /// Listens on `addr`.
    pub(super) fn bind(addr: SocketAddr) -> Result<Endpoint, Error> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            let why = match e.kind() {
                io::ErrorKind::AddrInUse => "the port is in use by another program; choose another port",
                io::ErrorKind::AddrNotAvailable => "no interface of this host has that address",
                io::ErrorKind::PermissionDenied => "ports below 1024 need root or CAP_NET_BIND_SERVICE",
                _ => "cannot listen there",
            };
            Error::io(format!("--metrics {addr}: {why}"), e)
        })?;
        let addr = listener.local_addr().map_err(|e| Error::io("reading the metrics socket's address", e))?;
        listener.set_nonblocking(true).map_err(|e| Error::io("setting the metrics socket non-blocking", e))?;
        Ok(Endpoint { listener, addr })
    }

    /// The address bound (with the port chosen, for port 0).
    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `/metrics` from a thread of its own until the daemon stops.
    pub(super) fn serve(self, daemon: Arc<Daemon>) -> Result<std::thread::JoinHandle<()>, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::io("starting the metrics server", e))?;
        std::thread::Builder::new()
            .name("vpstag-metrics".into())
            .spawn(move || rt.block_on(accept_loop(self.listener, daemon)))
            .map_err(|e| Error::io("starting the metrics thread", e))
    }
}

async fn accept_loop(listener: std::net::TcpListener, d: Arc<Daemon>) {
    let Some(m) = d.metrics.clone() else { return };
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log!("metrics: cannot serve: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (mut refused, mut last_note) = (0u64, Instant::now());
    let mut accept_failed = false;
    while !d.stop.load(Ordering::SeqCst) {
        let stream = match tokio::time::timeout(STOP_POLL, listener.accept()).await {
            Err(_) => continue,
            Ok(Ok((stream, _))) => stream,
            Ok(Err(e)) => {
                // Out of descriptors, most likely: say so once, and try again a little later.
                if !std::mem::replace(&mut accept_failed, true) {
                    log!("metrics: accepting a connection failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            // Closed at once (dropped): every slot is taken.
            refused += 1;
            if last_note.elapsed() >= Duration::from_secs(10) {
                log!("metrics: {refused} connections refused: {MAX_CONNECTIONS} scrapers already connected");
                (refused, last_note) = (0, Instant::now());
            }
            continue;
        };
        let (d, m) = (Arc::clone(&d), Arc::clone(&m));
        tokio::spawn(async move {
            let _slot = permit;
            let service = service_fn(move |req| {
                let r = answer(&d, &m, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // Dropping the connection at the deadline closes it, whatever it was waiting for.
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_means_loopback_and_other_addresses_only_when_given() {
        let lo = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p);
        assert_eq!(parse_addr("9478"), Ok(lo(9478)));
        assert_eq!(parse_addr(":9478"), Ok(lo(9478)));
        assert_eq!(parse_addr("0"), Ok(lo(0)));
        assert_eq!(parse_addr("localhost:9478"), Ok(lo(9478)));
        assert_eq!(parse_addr("127.0.0.1:0"), Ok(lo(0)));
        assert_eq!(parse_addr("0.0.0.0:9478"), Ok("0.0.0.0:9478".parse().unwrap()));
        assert_eq!(parse_addr("[::1]:9478"), Ok("[::1]:9478".parse().unwrap()));
        assert_eq!(parse_addr("[::]:1"), Ok("[::]:1".parse().unwrap()));
        for bad in
            ["", ":", "abc", "65536", "-1", "9478x", "1.2.3.4", "host:80", "::1:9478", "[::1]", "1.2.3.4:", "1.2.3.4:x"]
        {
            let e = parse_addr(bad).expect_err(bad);
            assert!(e.contains("PORT"), "{bad:?}: the message says what to give: {e}");
        }
        assert!(parse_addr("host:80").unwrap_err().contains("not a numeric IP address"));
        assert!(parse_addr("70000").unwrap_err().contains("at most 65535"));
    }

    #[test]
    fn the_text_has_every_family_with_help_and_type_and_escaped_labels() {
        let snap = Snapshot {
            vpses: vec![
                VpsFigures { name: "web".into(), owner: 0, processes: 3, cpu_ms: 1500, rss_bytes: 4096, forks: 7 },
                VpsFigures { name: "ci".into(), owner: 1000, processes: 1, cpu_ms: 0, rss_bytes: 0, forks: 0 },
            ],
            stats: Stats { events: 42, loss_reports: 1, lost_events: 5, resyncs: 2, ..Stats::default() },
            backend: "cnproc".into(),
        };
        let t = encode(&snap).unwrap();
        for line in [
            "# TYPE vpstag_vps_processes gauge",
            "vpstag_vps_processes{vps=\"web\",owner=\"0\"} 3",
            "vpstag_vps_processes{vps=\"ci\",owner=\"1000\"} 1",
            "# TYPE vpstag_vps_cpu_seconds_total counter",
            "vpstag_vps_cpu_seconds_total{vps=\"web\",owner=\"0\"} 1.5",
            "vpstag_vps_memory_bytes{vps=\"web\",owner=\"0\"} 4096",
            "# TYPE vpstag_vps_forks_total counter",
            "vpstag_vps_forks_total{vps=\"web\",owner=\"0\"} 7",
            "vpstag_events_total 42",
            "vpstag_events_lost_total 5",
            "vpstag_event_loss_reports_total 1",
            "vpstag_resyncs_total 2",
            "# TYPE vpstag_backend_info gauge",
            "vpstag_backend_info{backend=\"cnproc\"} 1",
        ] {
            assert!(t.lines().any(|l| l == line), "no line {line:?} in:\n{t}");
        }
        assert_eq!(t.lines().filter(|l| l.starts_with("# HELP ")).count(), 9, "{t}");
        assert_eq!(t.lines().filter(|l| l.starts_with("# TYPE ")).count(), 9, "{t}");
        // With no VPS, the per-VPS families are absent; the daemon's are there.
        let empty = encode(&Snapshot { vpses: vec![], ..snap.clone() }).unwrap();
        assert!(!empty.contains("vpstag_vps_"), "{empty}");
        assert!(empty.contains("\nvpstag_events_total 42\n"), "{empty}");
        // Names are checked by the manager, but a label value is escaped whatever it holds.
        let odd = VpsFigures { name: "a\"b\\c\nd".into(), ..snap.vpses[0].clone() };
        let t = encode(&Snapshot { vpses: vec![odd], ..snap }).unwrap();
        assert!(t.contains("vpstag_vps_processes{vps=\"a\\\"b\\\\c\\nd\",owner=\"0\"} 3\n"), "{t}");
    }
}
