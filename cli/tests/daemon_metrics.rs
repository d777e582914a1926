//! `vpstag daemon --metrics`: the real daemon serving Prometheus metrics, scraped with a plain
//! `TcpStream`, checked against what the daemon itself reports (`list --json`, `ps --json`) and
//! against the exposition format (with `promtool check metrics` too when `promtool` is on the
//! PATH or named by `$PROMTOOL`).
//!
//! Each test starts its own daemon on a temporary socket and state directory and cleans up, by
//! pid, everything it started. Needs root (the daemon's state directory must be root's; the cnproc
//! backend before Linux 6.6). Linux only, like the daemon's other end-to-end tests.
#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;

/// A daemon with `--metrics 127.0.0.1:0` on a temporary socket and state directory; the VPSes'
/// processes it saw and the daemon itself are killed (by pid) when dropped.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    backend: &'static str,
    child: Child,
    /// Where `/metrics` is served, from the daemon's log.
    addr: SocketAddr,
    /// Every (pid, start time) seen as a member, to kill at the end.
    seen: std::cell::RefCell<Vec<(i32, u64)>>,
}

impl Daemon {
    fn new(tag: &str, backend: &'static str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vpstag-metrics-{tag}-{backend}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let socket = dir.join("vpstag.sock");
        let log = std::fs::File::create(dir.join("daemon.log")).expect("creating the daemon's log");
        let child = Command::new(BIN)
            .args(["daemon", "--backend", backend, "--metrics", "127.0.0.1:0", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the daemon");
        let mut d = Daemon {
            dir,
            socket,
            backend,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            seen: Default::default(),
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(addr) = d.logged_addr() {
                if daemon_answers(&d.socket) {
                    d.addr = addr;
                    break;
                }
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("the daemon exited ({st}) at start:\n{}", d.log());
            }
            assert!(Instant::now() < end, "the daemon did not start serving metrics:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The address in the daemon's "serving metrics on http://ADDR/metrics" line.
    fn logged_addr(&self) -> Option<SocketAddr> {
        let log = self.log();
        let rest = log.split("serving metrics on http://").nth(1)?;
        rest.split("/metrics").next()?.parse().ok()
    }

    fn run(&self, args: &[&str]) -> Output {
        vpstag(&self.socket, args).output().expect("running vpstag")
    }

    /// `vpstag start NAME -- CMD...`: the first process's pid.
    fn start_vps(&self, name: &str, cmd: &[&str]) -> i32 {
        let mut args = vec!["start", name, "--"];
        args.extend_from_slice(cmd);
        let out = self.run(&args);
        assert!(out.status.success(), "start {name}: {}\n{}", text(&out.stderr), self.log());
        let pid: i32 = text(&out.stdout).trim().parse().expect("start prints a pid");
        self.seen.borrow_mut().push((pid, start_time(pid)));
        pid
    }

    /// `ps --json NAME`: the members' pids (recorded for the clean-up).
    fn members(&self, name: &str) -> Vec<i32> {
        let out = self.run(&["ps", "--json", name]);
        assert!(out.status.success(), "ps {name}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("ps --json prints JSON");
        let mut pids = Vec::new();
        for p in v.as_array().expect("ps --json prints an array") {
            let pid = p["pid"].as_i64().expect("a pid") as i32;
            self.seen.borrow_mut().push((pid, p["start"].as_u64().unwrap_or(0)));
            pids.push(pid);
        }
        pids
    }

    /// `list --json`'s entry for NAME.
    fn listed(&self, name: &str) -> Value {
        let out = self.run(&["list", "--json"]);
        assert!(out.status.success(), "list: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("list --json prints JSON");
        v.as_array().and_then(|a| a.iter().find(|x| x["name"] == name).cloned()).unwrap_or(Value::Null)
    }

    fn get(&self, path: &str) -> Result<Reply, String> {
        http(self.addr, &format!("GET {path} HTTP/1.1\r\nHost: vpstag\r\nConnection: close\r\n\r\n"))
    }

    /// A scrape of `/metrics`, checked against the exposition format, as samples.
    fn scrape(&self) -> Vec<Sample> {
        let r = self.get("/metrics").unwrap_or_else(|e| panic!("scraping: {e}\n{}", self.log()));
        assert_eq!(r.status, 200, "GET /metrics: {r:?}");
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"), "{r:?}");
        let samples = parse_exposition(&r.body).unwrap_or_else(|e| panic!("{e} in:\n{}", r.body));
        promtool_agrees(&r.body);
        samples
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("reading the daemon's threads: {e}"))
    }

    /// The daemon's TCP sockets that are not listening (its scrapers' connections), from its
    /// descriptors and /proc/net/tcp{,6}.
    fn tcp_connections(&self) -> usize {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap_or_else(|e| panic!("reading the daemon's descriptors: {e}"));
        let inodes: Vec<String> = fds
            .filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .collect();
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|t| std::fs::read_to_string(t).ok())
            .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // Field 3 is the state (0A: listening), field 9 the inode.
                f.len() > 9 && f[3] != "0A" && inodes.iter().any(|i| i == f[9])
            })
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for (pid, start) in self.seen.borrow().iter() {
            if *start == 0 || start_time(*pid) == *start {
                kill(*pid, libc::SIGKILL);
            }
        }
        let pid = self.child.id() as i32;
        kill(pid, libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        kill(pid, libc::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.backend, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends `request` to `addr` and reads the answer until the server closes the connection.
fn http(addr: SocketAddr, request: &str) -> Result<Reply, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| format!("connecting: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| format!("sending: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("reading the answer: {e} (after {} bytes)", raw.len()))?;
    let raw = String::from_utf8(raw).map_err(|e| format!("the answer is not UTF-8: {e}"))?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| format!("no end of headers in {raw:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Ok(Reply { status, headers, body: body.to_string() })
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || (colon && c == b':'))
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || (colon && c == b':'))
}

/// Parses the Prometheus text exposition format (version 0.0.4), strictly: every line a `# HELP`,
/// a `# TYPE` (at most one per family, before its samples, of a known type) or a sample
/// `name{label="value",...} value [timestamp]` with escapes `\\`, `\"`, `\n` only, of a family
/// that has a TYPE; the text ends with a newline.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    if !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !is_name(name, true) || helps.iter().any(|h| h == name) {
                return Err(at("a bad or repeated HELP"));
            }
            helps.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').ok_or_else(|| at("TYPE without a type"))?;
            if !is_name(name, true) || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                return Err(at("a bad TYPE"));
            }
            if samples.iter().any(|s: &Sample| s.name == name) || types.insert(name.into(), ty.into()).is_some() {
                return Err(at("a TYPE after its samples, or twice"));
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value"))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(at("a bad metric name"));
        }
        let mut labels = HashMap::new();
        let mut rest = &line[name_end..];
        if let Some(mut l) = rest.strip_prefix('{') {
            loop {
                if let Some(r) = l.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let (key, r) = l.split_once("=\"").ok_or_else(|| at("a label without =\""))?;
                if !is_name(key, false) || labels.contains_key(key) {
                    return Err(at("a bad or repeated label name"));
                }
                let mut value = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => return Err(at("a bad escape in a label value")),
                        },
                        Some((i, '"')) => break i,
                        Some((_, c)) => value.push(c),
                        None => return Err(at("an unterminated label value")),
                    }
                };
                labels.insert(key.to_string(), value);
                l = &r[end + 1..];
                l = l.strip_prefix(',').unwrap_or(l);
            }
        }
        let mut fields = rest.strip_prefix(' ').ok_or_else(|| at("no space before the value"))?.split(' ');
        let v = fields.next().unwrap_or_default();
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => v.parse().map_err(|_| at("a bad value"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| at("a bad timestamp"))?;
        }
        if fields.next().is_some() {
            return Err(at("more after the timestamp"));
        }
        if !types.contains_key(name) {
            return Err(at("a sample of a family without TYPE"));
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}

/// `promtool check metrics` on `text`, when a promtool is to be had (`$PROMTOOL`, or on the PATH).
fn promtool_agrees(text: &str) {
    let tool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let Ok(mut child) = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return;
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("writing to promtool");
    }
    let out = child.wait_with_output().expect("running promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        text_of(&out.stdout),
        text_of(&out.stderr)
    );
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The value of `name` for VPS `vps`, if it has a sample.
fn of_vps(samples: &[Sample], name: &str, vps: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name && s.labels.get("vps").map(String::as_str) == Some(vps)).map(|s| s.value)
}

/// The value of the unlabelled sample `name`.
fn global(samples: &[Sample], name: &str) -> f64 {
    samples.iter().find(|s| s.name == name && s.labels.is_empty()).map(|s| s.value).unwrap_or(f64::NAN)
}

/// The backends this build has (cnproc when it can be opened here, ptrace, ebpf when built in).
fn backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cnproc_available() {
        v.push("cnproc");
    }
    v.push("ptrace");
    match vpstag::open_backend(vpstag::BackendChoice::Ebpf) {
        Ok(_) => v.push("ebpf"),
        Err(e) => eprintln!("skipping ebpf: {e}"),
    }
    v
}

/// Forks `CHILDREN` children that sleep, burns 0.4 s of CPU itself, writes the file named by its
/// first argument, and sleeps.
const BURNER: &str = r#"
import os, sys, time
for _ in range(5):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
while sum(os.times()[:2]) < 0.4:
    pass
open(sys.argv[1], "w").close()
time.sleep(600)
"#;
const CHILDREN: f64 = 5.0;

/// A VPS that forks 5 children and burns CPU: its processes, forks, CPU seconds and memory are
/// what the daemon itself says (`ps`, `list`), the daemon's counters and backend are there, and
/// when it is stopped its samples leave while another VPS's stay. Under every backend built.
#[test]
fn the_figures_of_a_forking_burning_vps_are_real_and_a_stopped_vps_leaves() {
    if !is_root() {
        return;
    }
    for backend in backends() {
        let d = Daemon::new("figures", backend);
        let ready = d.dir.join("burner-ready");
        let ready_arg = ready.to_str().expect("a UTF-8 temporary path");
        d.start_vps("burn", &["/usr/bin/python3", "-c", BURNER, ready_arg]);
        d.start_vps("idle", &["sleep", "600"]);
        wait_until(&format!("{backend}: the burner to burn its CPU"), Duration::from_secs(60), || ready.exists());
        // The figures settle within a scrape interval: wait for the counts, then compare.
        let deadline = Instant::now() + Duration::from_secs(30);
        let last = loop {
            let members = d.members("burn").len() as f64;
            let last = d.scrape();
            if of_vps(&last, "vpstag_vps_processes", "burn") == Some(members)
                && of_vps(&last, "vpstag_vps_forks_total", "burn").unwrap_or(0.0) >= CHILDREN
            {
                break last;
            }
            assert!(Instant::now() < deadline, "{backend}: burn has {members} members; the metrics say:\n{last:#?}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let listed = d.listed("burn");
        let s = &last;
        let members = d.members("burn").len() as f64;
        assert_eq!(members, 1.0 + 1.0 + CHILDREN, "{backend}: init, python and its children: {listed}");
        assert_eq!(of_vps(s, "vpstag_vps_processes", "burn"), listed["members"].as_f64(), "{backend}: {s:#?}");
        let cpu = of_vps(s, "vpstag_vps_cpu_seconds_total", "burn").expect("a CPU sample");
        assert!(cpu >= 0.35, "{backend}: the burner burned 0.4 s, the metrics say {cpu}");
        let listed_cpu = listed["cpu_ms"].as_f64().expect("cpu_ms") / 1000.0;
        assert!((cpu - listed_cpu).abs() <= 0.05, "{backend}: /metrics says {cpu} s, list --json {listed_cpu} s");
        let mem = of_vps(s, "vpstag_vps_memory_bytes", "burn").expect("a memory sample");
        assert!(mem > 1e6, "{backend}: 7 processes in under 1 MB? {mem}");
        assert_eq!(of_vps(s, "vpstag_vps_forks_total", "burn").map(|f| f >= CHILDREN), Some(true));
        for sample in s.iter().filter(|x| x.labels.get("vps").map(String::as_str) == Some("burn")) {
            assert_eq!(sample.labels.get("owner").map(String::as_str), Some("0"), "{sample:?}");
        }
        assert_eq!(of_vps(s, "vpstag_vps_processes", "idle"), d.listed("idle")["members"].as_f64());
        assert!(global(s, "vpstag_events_total") >= CHILDREN, "{backend}: {s:#?}");
        for name in ["vpstag_events_lost_total", "vpstag_event_loss_reports_total", "vpstag_resyncs_total"] {
            assert!(global(s, name) >= 0.0, "{backend}: no {name} in {s:#?}");
        }
        let info: Vec<&Sample> = s.iter().filter(|x| x.name == "vpstag_backend_info").collect();
        assert_eq!(info.len(), 1, "{backend}: {info:?}");
        assert_eq!(info[0].labels.get("backend").map(String::as_str), Some(backend));
        assert_eq!(info[0].value, 1.0);

        // Stopped and forgotten: its samples leave; the other VPS's stay.
        let out = d.run(&["stop", "--grace", "1", "burn"]);
        assert!(out.status.success(), "stop: {}", text(&out.stderr));
        let mut s = Vec::new();
        wait_until(&format!("{backend}: burn to leave the metrics"), Duration::from_secs(10), || {
            s = d.scrape();
            !s.iter().any(|x| x.labels.get("vps").map(String::as_str) == Some("burn"))
        });
        assert!(of_vps(&s, "vpstag_vps_processes", "idle").is_some(), "{backend}: idle left too: {s:#?}");
    }
}

/// Forks a child that burns 0.5 s of CPU and exits; waits for it (so its time is in this
/// process's waited-for children's time), writes the child's own CPU seconds (`os.times`) to the
/// file named by its first argument, and sleeps.
const EXITED_BURNER: &str = r#"
import os, sys, time
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    while sum(os.times()[:2]) < 0.5:
        pass
    os.write(w, ("%.6f" % sum(os.times()[:2])).encode())
    os._exit(0)
os.close(w)
burned = os.read(r, 100).decode()
os.waitpid(pid, 0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(burned)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"#;

/// A VPS whose child burned CPU and exited: `list --json` counts that time in `cpu_ms` (the VPS's
/// live processes used next to nothing), with `memory_peak_bytes` and `forks`, and `/metrics`
/// says the same. Under every backend built.
#[test]
fn the_cpu_of_an_exited_child_is_in_list_and_in_the_metrics_alike() {
    if !is_root() {
        return;
    }
    for backend in backends() {
        let d = Daemon::new("exited", backend);
        let done = d.dir.join("child-burned");
        let done_arg = done.to_str().expect("a UTF-8 temporary path");
        d.start_vps("gone", &["/usr/bin/python3", "-c", EXITED_BURNER, done_arg]);
        wait_until(&format!("{backend}: the child to burn and be reaped"), Duration::from_secs(60), || done.exists());
        let burned: f64 = std::fs::read_to_string(&done)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("{backend}: the child's CPU time in {}", done.display()));
        assert!(burned >= 0.5, "{backend}: the child burned {burned} s");
        // Only the first process and the command are left: the child's time is theirs no more.
        wait_until(&format!("{backend}: the child to leave the VPS"), Duration::from_secs(30), || {
            d.members("gone").len() == 2
        });
        let listed = d.listed("gone");
        let listed_cpu = listed["cpu_ms"].as_f64().expect("cpu_ms") / 1000.0;
        assert!(
            listed_cpu >= burned * 0.95 && listed_cpu <= burned + 0.5,
            "{backend}: the exited child burned {burned} s, list --json says {listed_cpu} s: {listed}"
        );
        let rss = listed["rss_bytes"].as_u64().expect("rss_bytes");
        let peak = listed["memory_peak_bytes"].as_u64().expect("memory_peak_bytes");
        assert!(rss > 0 && peak >= rss, "{backend}: rss {rss}, peak {peak}: {listed}");
        assert!(listed["forks"].as_u64().expect("forks") >= 1, "{backend}: {listed}");
        let s = d.scrape();
        let cpu = of_vps(&s, "vpstag_vps_cpu_seconds_total", "gone").expect("a CPU sample");
        assert!((cpu - listed_cpu).abs() <= 0.05, "{backend}: /metrics says {cpu} s, list --json {listed_cpu} s");
        assert_eq!(of_vps(&s, "vpstag_vps_forks_total", "gone"), listed["forks"].as_f64(), "{backend}: {s:#?}");
    }
}

#[test]
fn other_paths_get_404_other_methods_405_and_head_gets_no_body() {
    if !is_root() {
        return;
    }
    let d = Daemon::new("paths", "ptrace");
    for path in ["/other", "/", "/metrics/x", "/metricsx"] {
        let r = d.get(path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 404, "GET {path}: {r:?}");
        assert!(r.body.contains("/metrics"), "the answer says where to look: {r:?}");
    }
    let r = http(d.addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .expect("POST");
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")), "{r:?}");
    let r = http(d.addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("HEAD");
    assert_eq!((r.status, r.body.as_str()), (200, ""), "{r:?}");
    // A query string is no other path.
    assert_eq!(d.get("/metrics?x=1").expect("GET with a query").status, 200);
    let r = http(d.addr, "garbage\r\n\r\n").unwrap_or_else(|e| panic!("garbage: {e}"));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(global(&d.scrape(), "vpstag_events_total") >= 0.0);
}

/// A bad `--metrics` value stops `vpstag daemon` at once, with exit status 2 and a message that
/// names the option and what to give, before anything is created.
#[test]
fn bad_metrics_values_are_refused_with_exit_status_2() {
    let dir = std::env::temp_dir().join(format!("vpstag-metrics-bad-{}", std::process::id()));
    for bad in ["", "abc", "70000", "127.0.0.1:70000", "1.2.3.4", "example.com:9478", "::1:9478", "127.0.0.1:-1"] {
        let out = Command::new(BIN)
            .args(["daemon", "--metrics", bad, "--socket"])
            .arg(dir.join("s"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .output()
            .expect("running vpstag");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--metrics {bad:?}: {err}");
        assert!(err.contains("--metrics") && err.contains("PORT"), "--metrics {bad:?}: {err}");
        assert!(!dir.exists(), "--metrics {bad:?}: something was created");
    }
}

/// A port another program holds stops the daemon at start with exit status 2 and says so, before
/// its socket exists.
#[test]
fn a_metrics_port_in_use_stops_the_daemon_with_a_clear_error() {
    if !is_root() {
        return;
    }
    let holder = TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let port = holder.local_addr().expect("its address").port();
    let dir = std::env::temp_dir().join(format!("vpstag-metrics-inuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(BIN)
        .args(["daemon", "--backend", "ptrace", "--metrics", &format!("127.0.0.1:{port}"), "--socket"])
        .arg(dir.join("s"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the daemon");
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for the daemon") {
            break st;
        }
        if Instant::now() > end {
            kill(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            panic!("the daemon kept running on a port in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("reading stderr");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("in use"), "{err}");
    assert!(!dir.join("s").exists());
    drop(holder);
}

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_within(mut s: &TcpStream, within: Duration) -> bool {
    let end = Instant::now() + within;
    let _ = s.set_read_timeout(Some(Duration::from_millis(100).min(within)));
    let mut b = [0u8; 512];
    while Instant::now() < end {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return true,
        }
    }
    false
}

/// Scrapers that connect and send nothing, or trickle their headers, cost no thread each: past
/// 16 connections the rest are closed at once, the held ones are closed by the header deadline
/// (5 s, even one that keeps sending), the daemon keeps tagging and answering meanwhile, and
/// afterwards a scrape works.
#[test]
fn idle_and_trickling_scrapers_are_bounded_and_cut_off() {
    if !is_root() {
        return;
    }
    let d = Daemon::new("flood", "ptrace");
    assert!(!d.scrape().is_empty());
    // The scrape's slot is the server's until it has dropped the connection, which may come
    // after this side read the end of the reply: counted below, it would hold one of the 16.
    wait_until("the daemon to close the first scrape's connection", Duration::from_secs(10), || {
        d.tcp_connections() == 0
    });
    let threads = d.threads();
    // One that trickles its headers (it takes a slot first), and 60 that send nothing.
    let mut trickle = TcpStream::connect(d.addr).expect("connecting");
    let trickle_since = Instant::now();
    trickle.write_all(b"GET /metrics HTTP/1.1\r\n").expect("sending the request line");
    let mut idle: Vec<TcpStream> =
        (0..60).map(|_| TcpStream::connect(d.addr).unwrap_or_else(|e| panic!("connecting: {e}"))).collect();
    // Those beyond the cap are closed at once (well before the 5 s header deadline); no thread is
    // started for any.
    let mut closed = vec![false; idle.len()];
    while closed.iter().filter(|c| **c).count() < 60 - 15 && trickle_since.elapsed() < Duration::from_secs(3) {
        for (s, c) in idle.iter().zip(closed.iter_mut()) {
            *c = *c || closed_within(s, Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let cut = closed.iter().filter(|c| **c).count();
    assert_eq!(cut, 60 - 15, "of 60 idle connections (and a trickling one), {cut} were closed at once; the cap is 16");
    assert_eq!(d.tcp_connections(), 16, "the connections the daemon holds");
    assert!(d.threads() <= threads, "the daemon had {threads} threads, now {}", d.threads());
    // The daemon keeps working meanwhile: a new VPS is tagged.
    let first = d.start_vps("busy", &["sleep", "600"]);
    let out = d.run(&["which", &first.to_string()]);
    assert_eq!(text(&out.stdout).trim(), "busy", "{}", text(&out.stderr));
    // The held ones are closed by the header deadline (5 s; the connection deadline is 10 s),
    // the trickling one too.
    let end = trickle_since + Duration::from_secs(15);
    let mut trickle_cut = None;
    while Instant::now() < end && (!idle.is_empty() || trickle_cut.is_none()) {
        if trickle_cut.is_none()
            && (trickle.write_all(b"X-Slow: 1\r\n").is_err() || closed_within(&trickle, Duration::from_millis(200)))
        {
            trickle_cut = Some(trickle_since.elapsed());
        }
        idle.retain(|s| !closed_within(s, Duration::from_millis(1)));
    }
    assert!(idle.is_empty(), "{} idle connections still open after 15 s", idle.len());
    let trickle_cut = trickle_cut.expect("a connection trickling its headers was never cut off");
    assert!(trickle_cut >= Duration::from_secs(3), "the trickling connection was served, then cut: {trickle_cut:?}");
    assert!(d.threads() <= threads, "the daemon had {threads} threads, now {}", d.threads());
    assert!(of_vps(&d.scrape(), "vpstag_vps_processes", "busy").is_some());
}

/// Every `vpstag_*` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("vpstag_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The Grafana dashboard and the Prometheus example in contrib/ name only metrics the daemon
/// serves (the dashboard's panels: CPU, processes, memory, forks, losses), and the example is a
/// valid Prometheus configuration (checked with promtool when there is one).
#[test]
fn the_contrib_dashboard_and_scrape_example_use_the_served_names() {
    if !is_root() {
        return;
    }
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib");
    let read =
        |p: &str| std::fs::read_to_string(contrib.join(p)).unwrap_or_else(|e| panic!("reading contrib/{p}: {e}"));
    let dashboard: Value = serde_json::from_str(&read("grafana/vpstag.json")).expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    let on_dashboard = metric_names(&exprs.join("\n"));
    let in_example = metric_names(&read("prometheus/vpstag.yml"));

    let d = Daemon::new("contrib", "ptrace");
    d.start_vps("one", &["sleep", "600"]);
    let served: std::collections::BTreeSet<String> = d.scrape().into_iter().map(|s| s.name).collect();
    for (what, names) in [("the dashboard", &on_dashboard), ("the scrape example", &in_example)] {
        let unknown: Vec<&String> = names.difference(&served).collect();
        assert!(unknown.is_empty(), "{what} names {unknown:?}, which the daemon does not serve ({served:?})");
    }
    for needed in [
        "vpstag_vps_cpu_seconds_total",
        "vpstag_vps_processes",
        "vpstag_vps_memory_bytes",
        "vpstag_vps_forks_total",
        "vpstag_events_lost_total",
    ] {
        assert!(on_dashboard.contains(needed), "no panel shows {needed}: {exprs:#?}");
    }
    let tool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    if let Ok(out) = Command::new(&tool).args(["check", "config"]).arg(contrib.join("prometheus/vpstag.yml")).output() {
        assert!(out.status.success(), "promtool check config: {}{}", text(&out.stdout), text(&out.stderr));
    }
}
