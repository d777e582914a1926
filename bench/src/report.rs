//! The report: a terminal table, BENCHMARKS.md and the SVG chart of the overhead ratios.

use crate::results::{DaemonResults, DaemonRow, OverheadRow, Results};
use crate::stats::{fmt_count, fmt_secs, fmt_summary, markdown_table, table, text_table, xml_escape, Summary};

/// The C PTRACE_SEIZE tracer's ratios (issue 4's goal for the ptrace backend).
const C_TRACER: [(&str, f64); 3] = [("seq", 0.69), ("burst", 0.42), ("spawn", 0.82)];
const MODES: [&str; 3] = ["seq", "burst", "spawn"];

fn row<'a>(r: &'a Results, mode: &str, variant: &str) -> Option<&'a OverheadRow> {
    r.overhead.iter().find(|o| o.mode == mode && o.variant == variant)
}

fn variants(r: &Results) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for o in &r.overhead {
        if !v.contains(&o.variant) {
            v.push(o.variant.clone());
        }
    }
    v
}

/// A goal, its result, and whether it was met (None: not measured).
struct Goal {
    goal: String,
    result: String,
    met: Option<bool>,
    /// By how much and why, when missed.
    why: String,
}

fn cpu_us(r: &Results, variant: &str) -> Option<f64> {
    let v: Vec<f64> = MODES.iter().filter_map(|m| row(r, m, variant)?.cpu_per_1e5.map(|s| s.median * 10.0)).collect();
    if v.is_empty() {
        None
    } else {
        Some(crate::stats::median(&v))
    }
}

fn goals(r: &Results) -> Vec<Goal> {
    let mut g = Vec::new();
    // Accuracy.
    if !r.accuracy.is_empty() {
        let mut parts = Vec::new();
        let mut ok = true;
        for (b, runs) in &r.accuracy {
            let m: u64 = runs.iter().map(|x| x.missed).sum();
            let t: u64 = runs.iter().map(|x| x.mistagged).sum();
            let s: u64 = runs.iter().map(|x| x.stale + x.stale_end as u64).sum();
            ok &= m + t + s == 0 && !runs.is_empty();
            parts.push(format!("{b}: {m} / {t} / {s}"));
        }
        g.push(Goal {
            goal: "accuracy: 0 missed / mis-tagged / stale".into(),
            result: parts.join("; "),
            met: Some(ok),
            why: {
                let ex: Vec<String> = r
                    .accuracy
                    .iter()
                    .flat_map(|(b, runs)| {
                        runs.iter().flat_map(move |x| x.examples.iter().map(move |e| format!("{b}: {e}")))
                    })
                    .take(6)
                    .collect();
                format!("discrepancies confirmed on a second look; examples: {}", ex.join("; "))
            },
        });
    }
    // cnproc overhead.
    let cn: Vec<(&str, f64)> =
        MODES.iter().filter_map(|m| row(r, m, "vpstag cnproc").map(|o| (*m, o.ratio.median))).collect();
    if !cn.is_empty() {
        let worst = cn.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        g.push(Goal {
            goal: "proc connector: slowdown under 3% (ratio ≥ 0.97)".into(),
            result: cn.iter().map(|(m, x)| format!("{m} {x:.3}")).collect::<Vec<_>>().join(", "),
            met: Some(worst >= 0.97),
            why: {
                let bare: Vec<String> = MODES
                    .iter()
                    .filter_map(|m| {
                        let o = row(r, m, "bare cnproc reader, 5 ms batches")?;
                        Some(format!(
                            "{m} {:.3}{}",
                            o.ratio.median,
                            o.cpu_per_1e5.map(|c| format!(" at {:.1} µs CPU per event", c.median * 10.0)).unwrap_or_default()
                        ))
                    })
                    .collect();
                let gaps: Vec<String> = MODES
                    .iter()
                    .filter_map(|m| {
                        let b = row(r, m, "bare cnproc reader, 5 ms batches")?.ratio.median;
                        let c = row(r, m, "vpstag cnproc")?.ratio.median;
                        Some(format!("{m} {:.1}", (b - c) * 100.0))
                    })
                    .collect();
                let bare_worst = MODES
                    .iter()
                    .filter_map(|m| row(r, m, "bare cnproc reader, 5 ms batches").map(|o| o.ratio.median))
                    .fold(f64::INFINITY, f64::min);
                let bare_txt = if bare.is_empty() {
                    String::new()
                } else {
                    format!(
                        " A bare reader of the same proc connector that drains every 5 ms (no manager) measured {} in the \
                         same run: {}; the manager's way of reading costs the rest (points below the bare reader: {}).",
                        bare.join(", "),
                        if bare_worst < 0.97 {
                            "the kernel's side (a netlink message built and queued in every fork, exec and exit) already \
                             takes a few percent on this machine, so even an ideal reader is at the edge of the goal"
                        } else {
                            "the kernel's side (a netlink message built and queued in every fork, exec and exit) costs the \
                             workload no more than the noise here"
                        },
                        gaps.join(", ")
                    )
                };
                // The spread of the worst mode: within the noise when it reaches the goal.
                let worst_spread = MODES
                    .iter()
                    .filter_map(|m| row(r, m, "vpstag cnproc").map(|o| o.ratio))
                    .min_by(|a, b| a.median.total_cmp(&b.median));
                let noise = match worst_spread {
                    Some(w) if w.max >= 0.97 => format!(
                        " The missed figure's spread ({:.3}–{:.3}) reaches the goal: on this shared machine that is \
                         within the noise.",
                        w.min, w.max
                    ),
                    _ => " What would close it: less work per event in the manager's thread, which the bare reader's \
                          figures bound."
                        .to_string(),
                };
                format!(
                    "by {:.1} points at worst ({:.3} vs 0.97). The manager drains the socket in batches ({} wake-ups per \
                     workload event, §3), up to 64 datagrams a system call (`recvmmsg`), and spends {} of CPU per event \
                     applying each to the table, its accounting and its subscribers.{}{}",
                    (0.97 - worst) * 100.0,
                    worst,
                    MODES
                        .iter()
                        .filter_map(|m| row(r, m, "vpstag cnproc")?.wakeups_per_event.map(|w| format!("{w:.2}")))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    cpu_us(r, "vpstag cnproc").map(|x| format!("{x:.1} µs")).unwrap_or("n/a".into()),
                    bare_txt,
                    noise
                )
            },
        });
    }
    // ptrace vs strace and the C tracer.
    let pt: Vec<(&str, f64, Option<f64>, f64)> = MODES
        .iter()
        .filter_map(|m| {
            let p = row(r, m, "vpstag ptrace")?.ratio.median;
            let s = row(r, m, "strace -f").map(|o| o.ratio.median);
            let c = C_TRACER.iter().find(|x| x.0 == *m).map(|x| x.1).unwrap_or(0.0);
            Some((*m, p, s, c))
        })
        .collect();
    if !pt.is_empty() {
        let beats_strace = pt.iter().all(|x| x.2.is_none_or(|s| x.1 > s));
        g.push(Goal {
            goal: "ptrace: lower slowdown than `strace -f`".into(),
            result: pt
                .iter()
                .map(|(m, p, s, _)| {
                    let tie = if s.is_some_and(|s| (p - s).abs() < 0.03) { " (within noise)" } else { "" };
                    format!("{m} {p:.2} vs {}{tie}", s.map(|s| format!("{s:.2}")).unwrap_or("n/a".into()))
                })
                .collect::<Vec<_>>()
                .join(", "),
            met: if pt.iter().any(|x| x.2.is_some()) { Some(beats_strace) } else { None },
            why: {
                let lose: Vec<String> = pt
                    .iter()
                    .filter_map(|(m, p, s, _)| s.filter(|s| p <= s).map(|s| format!("{m}: {p:.2} vs {s:.2}")))
                    .collect();
                format!(
                    "not better in {}. In fork+exit+wait the workload makes hardly any system call besides fork, exit and \
                     wait, so strace's syscall stops (it stops at every system call even with `-e trace=none`) are about as \
                     many as the backend's stops (the creator's fork event, the child's first stop, the exit-event stop, the \
                     parent's SIGCHLD stop) plus its per-event work (see the next goal); strace falls far behind only where \
                     programs make many system calls (spawn: exec and the dynamic loader).",
                    lose.join(", ")
                )
            },
        });
        let beats_c = pt.iter().all(|x| x.1 >= x.3);
        g.push(Goal {
            goal: "ptrace: at least the C PTRACE_SEIZE tracer's ratios (0.69 / 0.42 / 0.82)".into(),
            result: pt.iter().map(|(m, p, _, c)| format!("{m} {p:.2} (goal {c:.2})")).collect::<Vec<_>>().join(", "),
            met: Some(beats_c),
            why: {
                let short: Vec<String> =
                    pt.iter().filter(|x| x.1 < x.3).map(|(m, p, _, c)| format!("{m} by {:.0}%", (1.0 - p / c) * 100.0)).collect();
                format!(
                    "short in {}. Per fork the backend takes the creator's event stop and the child's first stop (the child is \
                     kept stopped until its creator's event is decoded), a `PTRACE_GETEVENTMSG` and a `PTRACE_GETREGS` of the \
                     creator (its clone flags; the child's start time then comes from the clock, `/proc` only for a few per \
                     cent of forks), then queues the event and signals an eventfd that the manager's thread (another thread \
                     to wake) drains; per exit, the `PTRACE_EVENT_EXIT` stop and the parent's SIGCHLD \
                     signal-delivery stop. The tracking process woke {} times per workload event and spent {} of CPU per event \
                     (§3). A minimal tracer does only the stops. The spawn workload is dominated by exec, so \
                     the stops matter less there.",
                    short.join(", "),
                    MODES
                        .iter()
                        .filter_map(|m| row(r, m, "vpstag ptrace")?.wakeups_per_event.map(|w| format!("{w:.1}")))
                        .collect::<Vec<_>>()
                        .join(" / "),
                    cpu_us(r, "vpstag ptrace").map(|x| format!("{x:.0} µs")).unwrap_or("n/a".into())
                )
            },
        });
    }
    // Listener CPU.
    let lc: Vec<(&str, f64, f64)> = MODES
        .iter()
        .filter_map(|m| {
            let ours = row(r, m, "vpstag cnproc")?.cpu_per_1e5?.median;
            let fs = row(r, m, "forkstat")?.cpu_per_1e5?.median;
            Some((*m, ours, fs))
        })
        .collect();
    if !lc.is_empty() {
        g.push(Goal {
            goal: "listener CPU below forkstat's (CPU s per 10^5 events)".into(),
            result: lc.iter().map(|(m, o, f)| format!("{m} {o:.3} vs {f:.3}")).collect::<Vec<_>>().join(", "),
            met: Some(lc.iter().all(|x| x.1 < x.2)),
            why: {
                let bad: Vec<String> = lc
                    .iter()
                    .filter(|x| x.1 >= x.2)
                    .map(|(m, o, f)| {
                        let wk = row(r, m, "vpstag cnproc").and_then(|o| o.wakeups_per_event).map(|w| format!(", {w:.2} wake-ups per event")).unwrap_or_default();
                        format!("{m}: {:.1} vs {:.1} µs per event, {:.0}% more{wk}", o * 10.0, f * 10.0, (o / f - 1.0) * 100.0)
                    })
                    .collect();
                format!(
                    "{}. The event thread wakes about once per event, and each wake-up costs a poll, the manager's lock, \
                     a `recvfrom` per datagram plus one that finds nothing, and a futex wake of waiters; forkstat reads the \
                     same socket in a blocking loop. The CPU per event also swings with the load (how many events each \
                     wake-up finds), as the spread shows.",
                    bad.join("; ")
                )
            },
        });
    }
    // Latency.
    if !r.latency.is_empty() {
        g.push(Goal {
            goal: "p99 tag latency under 1 ms".into(),
            result: r
                .latency
                .iter()
                .map(|(b, _, p99, _)| format!("{b} {}", fmt_secs(p99.median)))
                .collect::<Vec<_>>()
                .join(", "),
            met: Some(r.latency.iter().all(|(_, _, p99, agg)| p99.median < 1e-3 && agg.untagged == 0)),
            why: "some p99 is over 1 ms or some child was never tagged (see §4); the figure includes the socket hop."
                .into(),
        });
    }
    // Loss.
    let full: Vec<_> = r.loss.iter().filter(|l| l.target_rate == 0.0 && l.rcvbuf.contains("default")).collect();
    if !full.is_empty() {
        g.push(Goal {
            goal: "zero loss at the machine's full fork rate (8 MiB buffer)".into(),
            result: full
                .iter()
                .map(|l| format!("{}: {}/s, {} lost events, {} loss reports", l.label, fmt_count(l.rate.median), l.lost_events.max, l.loss_reports.max))
                .collect::<Vec<_>>()
                .join("; "),
            met: Some(full.iter().all(|l| l.loss_reports.max == 0.0 && l.runs > 0)),
            why: "events were lost at full rate with the default buffer (see §5): the event thread fell behind the forkers.".into(),
        });
    }
    // Table.
    if !r.scale.is_empty() {
        // Criterion's figures when there are any (the issue's method), else the binary's own loop.
        let crit: Vec<(String, f64)> = r
            .criterion
            .iter()
            .filter(|(id, _)| !id.contains("manager"))
            .map(|(id, ns)| (id.clone(), 1e9 / ns))
            .collect();
        let own: Vec<(String, f64)> =
            r.scale.iter().map(|x| (format!("{} {}", x.kind, x.entries), x.lookups_per_sec)).collect();
        let src = if crit.is_empty() { &own } else { &crit };
        let worst = src.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        let own_worst = own.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        g.push(Goal {
            goal: "10^7 look-ups per second (`MappingTable::vps_of`)".into(),
            result: if crit.is_empty() {
                format!("slowest size: {worst:.2e}/s (vpstag-bench's loop; no criterion results)")
            } else {
                format!("criterion, slowest: {worst:.2e}/s; vpstag-bench's own loop, slowest: {own_worst:.2e}/s")
            },
            met: Some(worst >= 1e7),
            why: {
                let slow: Vec<String> = src
                    .iter()
                    .filter(|x| x.1 < 1e7)
                    .map(|(id, v)| format!("{id}: {v:.2e}/s, {:.0}% short", (1.0 - v / 1e7) * 100.0))
                    .collect();
                format!(
                    "{}. A table of 10^6 entries (~100 MB) does not fit in the caches: every look-up in random pid order \
                     is a SipHash of the pid and a cache miss or two to memory (and the machine is shared). Smaller tables \
                     are far above the goal; a pid-indexed array (pid_max entries) or a faster hasher would be the fix, if \
                     10^6-entry tables matter.",
                    slow.join("; ")
                )
            },
        });
        let most = r.scale.iter().map(|s| s.bytes_per_entry).fold(0.0, f64::max);
        let least = r.scale.iter().map(|s| s.bytes_per_entry).fold(f64::INFINITY, f64::min);
        g.push(Goal {
            goal: "under 100 bytes per entry".into(),
            result: format!("{least:.0}–{most:.0} B depending on the size"),
            met: Some(most < 100.0),
            why: format!(
                "by up to {:.0} B ({:.0}%). Each entry is a `(Pid, Entry)` bucket of {} B plus a control byte in the pid map, \
                 and 4 B plus a control byte in its VPS's member set: ~{} B per bucket. hashbrown's capacity is a power of two \
                 filled to at most 7/8, so the bytes per entry swing between ~{:.0} B (just before growing) and ~{:.0} B (just \
                 after). A smaller `Entry` (it holds a 16 B identity, an 8 B VPS id, the parent and thread bookkeeping) or \
                 one map instead of two would bring it under 100 B at every size.",
                most - 100.0,
                (most / 100.0 - 1.0) * 100.0,
                4usize.next_multiple_of(8) + r.entry_size,
                4usize.next_multiple_of(8) + r.entry_size + 1 + 5,
                (4usize.next_multiple_of(8) + r.entry_size + 1 + 5) as f64 / 0.875,
                (4usize.next_multiple_of(8) + r.entry_size + 1 + 5) as f64 / 0.4375
            ),
        });
    }
    if let Some(d) = &r.daemon {
        g.extend(daemon_goals(d));
    }
    g
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn overhead_table(r: &Results, md: bool) -> String {
    let mut rows = Vec::new();
    let mut u = vec!["untracked (ops/s)".to_string()];
    for m in MODES {
        u.push(r.untracked.iter().find(|x| x.0 == m).map(|x| rate_summary(&x.1)).unwrap_or_default());
    }
    rows.push(u);
    for v in variants(r) {
        let mut line = vec![v.clone()];
        for m in MODES {
            line.push(row(r, m, &v).map(|o| fmt_summary(&o.ratio, 3)).unwrap_or_else(|| "–".into()));
        }
        rows.push(line);
    }
    let h = [
        "ratio tracked/untracked",
        "seq (fork+exit+wait)",
        "burst (fork 50, wait all)",
        "spawn (posix_spawn /bin/true)",
    ];
    table(md, &h, &rows)
}

fn rate_summary(s: &Summary) -> String {
    if s.n == 0 {
        return "n/a".into();
    }
    format!("{} ({}–{})", fmt_count(s.median), fmt_count(s.min), fmt_count(s.max))
}

fn listener_table(r: &Results, md: bool) -> String {
    let mut rows = Vec::new();
    for v in variants(r) {
        if !MODES.iter().any(|m| row(r, m, &v).is_some_and(|o| o.cpu_per_1e5.is_some())) {
            continue;
        }
        let mut line = vec![v.clone()];
        for m in MODES {
            line.push(
                row(r, m, &v)
                    .and_then(|o| o.cpu_per_1e5)
                    .map(|s| format!("{} = {:.1} µs/event", fmt_summary(&s, 3), s.median * 10.0))
                    .unwrap_or_else(|| "–".into()),
            );
        }
        let seen: Vec<String> = MODES
            .iter()
            .filter_map(|m| row(r, m, &v).and_then(|o| o.events_seen_per_event).map(|x| format!("{x:.2}")))
            .collect();
        line.push(if seen.is_empty() { "–".into() } else { seen.join(" / ") });
        let wk: Vec<String> = MODES
            .iter()
            .filter_map(|m| row(r, m, &v).and_then(|o| o.wakeups_per_event).map(|x| format!("{x:.2}")))
            .collect();
        line.push(if wk.is_empty() { "–".into() } else { wk.join(" / ") });
        rows.push(line);
    }
    let h = [
        "listener: CPU s per 10^5 events",
        "seq",
        "burst",
        "spawn",
        "events applied per workload event (seq / burst / spawn)",
        "wake-ups per workload event",
    ];
    table(md, &h, &rows)
}

fn accuracy_table(r: &Results, md: bool) -> String {
    let mut rows = Vec::new();
    for (b, runs) in &r.accuracy {
        for (i, x) in runs.iter().enumerate() {
            rows.push(vec![
                format!("{b} #{}", i + 1),
                fmt_count(x.created as f64),
                x.vpses.to_string(),
                x.wraps.to_string(),
                x.checkpoints.to_string(),
                fmt_count(x.checked as f64),
                x.missed.to_string(),
                x.mistagged.to_string(),
                x.stale.to_string(),
                x.stale_end.to_string(),
                format!("{} / {}", x.loss_reports, x.resyncs),
                format!("{:.1} s", x.secs),
            ]);
        }
    }
    let h = [
        "backend run",
        "processes",
        "VPSes",
        "PID wraps",
        "checkpoints",
        "live compared",
        "missed",
        "mis-tagged",
        "stale",
        "stale at end",
        "loss reports / resyncs",
        "time",
    ];
    table(md, &h, &rows)
}

fn latency_table(r: &Results, md: bool) -> String {
    let rows: Vec<Vec<String>> = r
        .latency
        .iter()
        .map(|(b, p50, p99, a)| {
            vec![
                b.clone(),
                us(p50),
                us(p99),
                fmt_secs(a.max),
                format!("{} / {}", fmt_secs(a.hop_p50), fmt_secs(a.hop_p99)),
                a.samples.to_string(),
                a.retried.to_string(),
                a.untagged.to_string(),
            ]
        })
        .collect();
    let h = [
        "backend",
        "p50 (µs)",
        "p99 (µs)",
        "max",
        "of which socket hop p50 / p99",
        "samples",
        "needed >1 query",
        "never tagged",
    ];
    table(md, &h, &rows)
}

fn us(s: &Summary) -> String {
    let t = Summary { median: s.median * 1e6, min: s.min * 1e6, max: s.max * 1e6, n: s.n };
    fmt_summary(&t, 0)
}

fn loss_table(r: &Results, md: bool) -> String {
    let rows: Vec<Vec<String>> = r
        .loss
        .iter()
        .map(|l| {
            vec![
                l.label.clone(),
                l.rcvbuf.clone(),
                format!("{} × {}", l.parallel, l.mode),
                rate_summary(&l.rate),
                fmt_summary(&l.loss_reports, 0),
                fmt_summary(&l.lost_events, 0),
                fmt_summary(&l.resyncs, 0),
                format!("{}/{}", l.exact_runs, l.runs),
                if l.resync_secs.n > 0 { fmt_secs(l.resync_secs.median) } else { "–".into() },
                format!("{}/{}", l.wait_missed, l.runs),
            ]
        })
        .collect();
    let h = [
        "run",
        "receive buffer",
        "forkers",
        "fork rate (/s)",
        "loss reports",
        "events known lost",
        "resyncs",
        "final table exact",
        "one resync",
        "`wait` missed the end",
    ];
    table(md, &h, &rows)
}

fn scale_table(r: &Results, md: bool) -> String {
    let rows: Vec<Vec<String>> = r
        .scale
        .iter()
        .map(|s| {
            vec![
                fmt_count(s.entries as f64),
                s.kind.clone(),
                format!("{:.1}", s.bytes_per_entry),
                format!("{:.2e} ({:.2e}–{:.2e})", s.lookups_per_sec, s.lookups_min, s.lookups_max),
                s.manager_lookups_per_sec.map(|x| format!("{x:.2e}")).unwrap_or_else(|| "–".into()),
            ]
        })
        .collect();
    let h = ["entries", "table", "bytes per entry", "`MappingTable::vps_of` per s", "`Manager::vps_of` per s"];
    table(md, &h, &rows)
}

fn resync_table(r: &Results, md: bool) -> String {
    let rows: Vec<Vec<String>> = r
        .resync
        .iter()
        .map(|x| {
            vec![
                fmt_count(x.live as f64),
                fmt_secs(x.manager_new),
                fmt_secs(x.adopt),
                format!("{} ({}–{})", fmt_secs(x.resync), fmt_secs(x.resync_min), fmt_secs(x.resync_max)),
                fmt_secs(x.kill_all),
            ]
        })
        .collect();
    let h = [
        "live processes",
        "`Manager::new` (start-up scan)",
        "`adopt` (scan + tag all)",
        "`resync()` with all tagged",
        "`kill_all`",
    ];
    table(md, &h, &rows)
}

/// The terminal report.
pub fn text(r: &Results) -> String {
    let mut s = String::new();
    if !r.command.is_empty() {
        s.push_str(&format!("command: {}\n", r.command));
    }
    s.push_str(&format!("vpstag benchmarks, {} ({:.0} s)\n\n", r.date, r.elapsed));
    let g = goals(r);
    if !g.is_empty() {
        let rows: Vec<Vec<String>> =
            g.iter().map(|x| vec![x.goal.clone(), x.result.clone(), met(x.met).replace("**", "")]).collect();
        s.push_str(&text_table(&["goal", "result", ""], &rows));
        s.push('\n');
    }
    if !r.accuracy.is_empty() {
        s.push_str(&accuracy_table(r, false));
        s.push('\n');
    }
    if !r.overhead.is_empty() {
        s.push_str(&overhead_table(r, false));
        s.push('\n');
        s.push_str(&listener_table(r, false));
        s.push('\n');
    }
    if !r.latency.is_empty() {
        s.push_str(&latency_table(r, false));
        s.push('\n');
    }
    if !r.loss.is_empty() {
        s.push_str(&loss_table(r, false));
        s.push('\n');
    }
    if !r.scale.is_empty() {
        s.push_str(&scale_table(r, false));
        s.push('\n');
        s.push_str(&resync_table(r, false));
    }
    if let Some(d) = &r.daemon {
        s.push_str(&format!("\nThe daemon as deployed ({}):\n", d.command));
        s.push_str(&daemon_ratio_table(d, false));
        s.push('\n');
        s.push_str(&daemon_cost_table(d, false));
        for (n, why) in &d.unavailable {
            s.push_str(&format!("not measured: {n}: {why}\n"));
        }
        for f in &d.failures {
            s.push_str(&format!("failed: {f}\n"));
        }
        for w in daemon_noise(d) {
            s.push_str(&format!("warning: {w}\n"));
        }
    }
    for (n, why) in &r.unavailable {
        s.push_str(&format!("not measured: {n}: {why}\n"));
    }
    s
}

/// BENCHMARKS.md.
pub fn markdown(r: &Results, svg: &str) -> String {
    let mut s = String::new();
    s.push_str("# vpstag benchmarks\n\n");
    s.push_str(&format!(
        "Measured on {} by `{}` (run from the workspace root after `{}`{}; \
         {:.0} s in all). Every figure is the median of the rounds with their spread (min–max) in parentheses; \
         every ratio compares runs of the same invocation, each tracked run with the untracked runs just before and \
         after it (ABAB…). {} rounds. Workloads pinned to CPU {} (`sched_setaffinity`, inherited by their children); listeners (vpstag's \
         tracking process, strace, forkstat) {}. Load average before/after: {} / {} \
         (the machine is shared: other builds may run).\n\n",
        r.date,
        r.command,
        if r.build.is_empty() { "cargo build --release -p vpstag-bench" } else { &r.build },
        if r.criterion.is_empty() { "" } else { " and `cargo bench --bench table` for the criterion figures" },
        r.elapsed,
        r.rounds,
        r.pin_cpu,
        if r.tracker_cpu == "none" { "not pinned".to_string() } else { format!("pinned to CPU {}", r.tracker_cpu) },
        r.load_before,
        r.load_after
    ));
    let m: Vec<Vec<String>> = r.machine.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
    s.push_str(&markdown_table(&["machine", ""], &m));
    s.push('\n');
    for (n, why) in &r.unavailable {
        s.push_str(&format!("- Not measured: **{n}**: {why}.\n"));
    }
    if !r.unavailable.is_empty() {
        s.push('\n');
    }
    let g = goals(r);
    if !g.is_empty() {
        s.push_str("## Goals\n\n");
        let rows: Vec<Vec<String>> =
            g.iter().map(|x| vec![x.goal.clone(), x.result.clone(), met(x.met).into()]).collect();
        s.push_str(&markdown_table(&["goal (2-core machine)", "result (medians)", ""], &rows));
        s.push('\n');
        let missed: Vec<&Goal> = g.iter().filter(|x| x.met == Some(false)).collect();
        if !missed.is_empty() {
            s.push_str("Missed goals, by how much and why:\n\n");
            for x in missed {
                s.push_str(&format!("- **{}**: {}\n", x.goal, x.why));
            }
            s.push('\n');
        }
        let missed_wait: usize = r.loss.iter().map(|l| l.wait_missed).sum();
        let lossy: usize = r.loss.iter().filter(|l| l.loss_reports.max > 0.0).map(|l| l.runs).sum();
        if missed_wait > 0 {
            s.push_str(&format!(
                "Also found: in {missed_wait} of the {lossy} runs of the §5 rows with losses, `Manager::wait` never \
                 returned although the VPS's first process had ended: its exit event was among the lost ones, and the \
                 resync that follows removes the table entry but does not mark the first process gone (nor reap it). \
                 The bench notices from /proc after 3 s and reaps it itself; a caller of `Manager::wait` without a timeout \
                 would wait forever.\n\n"
            ));
        }
    }
    if !r.accuracy.is_empty() {
        s.push_str(&format!(
            "## 1. Accuracy under load\n\n{} processes per run across the VPSes, created in turn by fork, double fork \
             (the grandchild is re-parented to the VPS's init), posix_spawn and fork from a second thread; one in ten \
             stays alive (up to 60 per VPS, the oldest killed first), the rest exit at once. At each checkpoint the \
             workers stop and every live process is compared with the table by its /proc ancestry: *missed* (below a \
             VPS, not in the table), *mis-tagged* (another VPS, or tagged while below none), *stale* (an entry whose \
             process is gone or whose pid now belongs to another process). A discrepancy counts only if a second look \
             confirms it. *Stale at end*: entries left once every VPS process is gone. PID wraps: pid_max is {}.\n\n",
            fmt_count(r.accuracy_procs as f64),
            r.machine.iter().find(|x| x.0 == "pid_max").map(|x| x.1.as_str()).unwrap_or("?")
        ));
        s.push_str(&accuracy_table(r, true));
        s.push('\n');
    }
    if !r.overhead.is_empty() {
        s.push_str("## 2. Overhead on a forking workload\n\n");
        s.push_str(&format!(
            "The workload (`vpstag-bench work`) creates a fixed count of processes ({}) and times itself. It runs \
             untracked; as the command of a VPS under each vpstag backend (the manager alone in its process); with a \
             bare proc-connector reader (vpstag's backend without the manager, draining every 5 ms: what the kernel \
             side costs); under `strace -f -e trace=none -o /dev/null`; and with `forkstat -q -e fork,exec,exit` \
             listening. Ratio = tracked rate / untracked rate (1.00: no slowdown).\n\n",
            r.counts.iter().map(|(m, c)| format!("{m}: {}", fmt_count(*c as f64))).collect::<Vec<_>>().join(", ")
        ));
        s.push_str(&overhead_table(r, true));
        s.push_str(&format!(
            "\n![overhead ratios]({svg})\n\nFor reference, seen here before: proc connector waking per event 0.91, \
             draining in batches with an 8 MiB buffer 1.00; `strace -f` 0.45 / 0.21 / 0.08; `forkstat` 0.73 (burst), \
             0.83 (spawn); a minimal C PTRACE_SEIZE tracer 0.69 / 0.42 / 0.82.\n\n"
        ));
        s.push_str("## 3. Listener cost\n\n");
        s.push_str(
            "CPU seconds (user + system) of the listening process per 10^5 workload events (fork and exit per \
             creation, plus exec for spawn), measured over the overhead runs: for vpstag, `getrusage(RUSAGE_SELF)` \
             of the tracking process from the VPS's start to its end (the manager's event thread and its waiting \
             main thread; the VPS's processes are other processes); for forkstat, `wait4`'s rusage of the forkstat \
             process (including its 0.3 s start). Host-wide listeners also receive the events of everything else \
             running: the last column says how many events the manager applied per workload event.\n\n",
        );
        s.push_str(&listener_table(r, true));
        s.push('\n');
    }
    if !r.latency.is_empty() {
        s.push_str("## 4. Tag latency\n\n");
        s.push_str(
            "A VPS process forks a child (held alive), takes CLOCK_MONOTONIC as `fork()` returns and sends (pid, time) \
             over a socket to the tracking process, which calls `Manager::vps_of(pid)` until it names the VPS. The figure \
             includes the socket hop (shown on its own), so it is an upper bound. p50 and p99 are per run; the table \
             gives the median over runs (min–max).\n\n",
        );
        s.push_str(&latency_table(r, true));
        s.push('\n');
    }
    if !r.loss.is_empty() {
        s.push_str("## 5. Event loss\n\n");
        s.push_str(&format!(
            "{} forking processes (not pinned) as the VPS's command, under the proc connector. *Full rate*: as fast as \
             they can; the untracked full rate of the same forkers, measured alongside, is {}/s. *Small buffer*: \
             the receive buffer shrunk to force loss; the paced runs find the highest rate with no loss with that \
             buffer ({}). *Final table exact*: once the VPS is empty, `Manager::check` finds no divergence and the \
             table is empty. *One resync*: an explicit `resync()` after the run. *`wait` missed the end*: runs where \
             `Manager::wait` had not returned 3 s after the VPS's first process had ended (its exit event was among the \
             lost ones, and a resync removes the entry but does not mark the first process gone); the bench then reaps \
             it itself.\n\n",
            r.loss_parallel,
            r.untracked_parallel_rate.as_ref().map(rate_summary).unwrap_or("n/a".into()),
            r.highest_zero_loss_small.map(|x| format!("{}/s", fmt_count(x))).unwrap_or("none of the paced rates".into())
        ));
        s.push_str(&loss_table(r, true));
        s.push('\n');
        let full: Vec<_> = r.loss.iter().filter(|l| l.target_rate == 0.0 && l.rcvbuf.contains("default")).collect();
        if !full.is_empty() && full.iter().all(|l| l.loss_reports.max == 0.0) {
            let best = full.iter().map(|l| l.rate.max).fold(0.0, f64::max);
            s.push_str(&format!(
                "With the default 8 MiB buffer no run lost an event, up to {}/s tracked: the highest sustained rate with \
                 zero loss is the machine's full fork rate (the forkers cannot go faster here). Above what a buffer can \
                 absorb (the small-buffer rows), losses are detected (overflows and sequence gaps), each is followed by a \
                 resync from /proc, the fork rate drops by the resyncs' cost, and the final table is still exact.\n\n",
                fmt_count(best)
            ));
        }
    }
    if !r.scale.is_empty() {
        s.push_str("## 6. Table scale\n\n");
        s.push_str(
            "`Manager::vps_of` first drains the backend (a `recvfrom` that usually finds nothing) under the manager's \
             lock, which is most of its cost. *real*: the table of a manager that adopted a process with N sleeping children (a copy from \
             `Manager::table()`, its allocation counted by the bench binary's counting global allocator). PIDs stop at \
             pid_max, so larger sizes use a *proxy* with `MappingTable`'s layout (`HashMap<Pid, _>` with a value of \
             `size_of::<Entry>()` bytes, plus the per-VPS `HashSet<Pid>`s), filled with synthetic pids; the rows where \
             both exist show how close the proxy is. Look-ups are hits in a strided order; `Manager::vps_of` also \
             takes the manager's lock and drains the backend.\n\n",
        );
        s.push_str(&scale_table(r, true));
        s.push('\n');
        if !r.criterion.is_empty() {
            s.push_str(
                "Criterion (`cargo bench --bench table`, the latest results found), one look-up per iteration:\n\n",
            );
            let rows: Vec<Vec<String>> = r
                .criterion
                .iter()
                .map(|(id, ns)| vec![id.clone(), format!("{ns:.1} ns"), format!("{:.2e}", 1e9 / ns)])
                .collect();
            s.push_str(&markdown_table(&["benchmark", "median time", "per second"], &rows));
            s.push('\n');
        }
        s.push_str("Start-up and resync with many live processes (the holder's children, sleeping):\n\n");
        s.push_str(&resync_table(r, true));
        s.push('\n');
    }
    if let Some(d) = &r.daemon {
        s.push_str(&daemon_markdown(d));
    }
    s.push_str(
        "## Notes\n\n\
         - The machine is a shared 2-vCPU VM: rates move by ±25% between rounds, which is why each tracked run is compared \
         with the untracked runs on both sides of it and the spread is shown. A ratio above 1.00 (seen at times for spawn, \
         whose runs are short and dominated by exec) is noise, or the idle vCPU waking faster while a listener keeps it busy.\n\
         - Host-wide listeners (the proc connector, forkstat) also pay for every other process on the host; ptrace and \
         strace only for the traced tree.\n\
         - The bench is not part of `cargo test`; its crate's unit tests cover only the pure helpers (median, ratio, \
         percentiles, formatting, /proc/PID/stat parsing).\n\n",
    );
    s.push_str(
        "## How to run\n\n```sh\nbench/install-deps                          # strace, forkstat\n\
         cargo build --release -p vpstag-bench       # add --features ebpf for the eBPF backend\n\
         target/release/vpstag-bench run             # CI-sized: 10^4 processes, 3 rounds\n\
         target/release/vpstag-bench run --full      # 10^5 processes, 5 rounds, longer workloads\n\
         target/release/vpstag-bench daemon          # the daemon as deployed (needs target/release/vpstag)\n\
         cargo bench --bench table                   # criterion: table look-ups\n```\n\n\
         `--parts accuracy,overhead,latency,loss,scale,daemon` picks parts, `--backends` picks backends, `--out -` and \
         `--svg -` skip writing files, `--json FILE` keeps every figure. Run as root (the proc connector's 8 MiB \
         buffer needs `CAP_NET_ADMIN`).\n",
    );
    s
}

/// The chart: the overhead ratios per tracker and workload, with min–max whiskers.
pub fn svg(r: &Results) -> String {
    let vars: Vec<String> = variants(r);
    let colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"];
    let (w, h) = (860.0, 380.0);
    let (left, right, top, bottom) = (60.0, 260.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let top_ratio = r.overhead.iter().map(|o| o.ratio.max).filter(|x| x.is_finite()).fold(1.2, f64::max);
    let ymax = (top_ratio * 5.0).ceil() / 5.0;
    let y = |v: f64| top + ph * (1.0 - (v.clamp(0.0, ymax) / ymax));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Fork rate tracked / untracked (median, min–max), {}</text>\n",
        left + pw / 2.0,
        xml_escape(&r.date)
    );
    let mut t = 0.0;
    while t <= ymax + 1e-9 {
        s.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{t:.1}</text>\n",
            left + pw,
            y(t),
            y(t),
            left - 6.0,
            y(t) + 4.0
        ));
        t += 0.2;
    }
    s.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\" stroke-dasharray=\"5,4\"/>\n",
        left + pw,
        y(0.97),
        y(0.97)
    ));
    let gw = pw / MODES.len() as f64;
    let nb = vars.len().max(1) as f64;
    let bw = (gw * 0.8) / nb;
    for (mi, m) in MODES.iter().enumerate() {
        let gx = left + gw * mi as f64 + gw * 0.1;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{m}</text>\n",
            gx + gw * 0.4,
            h - bottom + 18.0
        ));
        for (vi, v) in vars.iter().enumerate() {
            let Some(o) = row(r, m, v) else { continue };
            if o.ratio.n == 0 {
                continue;
            }
            let x = gx + bw * vi as f64;
            let c = colors[vi % colors.len()];
            s.push_str(&format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{c}\"><title>{}: {}</title></rect>\n",
                x + 1.0,
                y(o.ratio.median),
                bw - 2.0,
                y(0.0) - y(o.ratio.median),
                xml_escape(v),
                fmt_summary(&o.ratio, 3)
            ));
            let cx = x + bw / 2.0;
            s.push_str(&format!(
                "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
                y(o.ratio.min),
                y(o.ratio.max)
            ));
            if v == "vpstag ptrace" {
                if let Some((_, c)) = C_TRACER.iter().find(|x| x.0 == *m) {
                    s.push_str(&format!(
                        "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#c00\" stroke-width=\"2\"/>\n",
                        x - 1.0,
                        x + bw + 1.0,
                        y(*c),
                        y(*c)
                    ));
                }
            }
            s.push_str(&format!(
                "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{:.2}</text>\n",
                y(o.ratio.max) - 4.0,
                o.ratio.median
            ));
        }
    }
    s.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
        left + pw,
        y(0.0),
        y(0.0)
    ));
    for (vi, v) in vars.iter().enumerate() {
        let ly = top + 40.0 + 20.0 * vi as f64;
        s.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            left + pw + 6.0,
            ly - 10.0,
            colors[vi % colors.len()],
            left + pw + 24.0,
            ly,
            xml_escape(v)
        ));
    }
    let ly = top + 40.0 + 20.0 * vars.len() as f64 + 10.0;
    s.push_str(&format!(
        "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"#999\" stroke-dasharray=\"5,4\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">0.97: cnproc goal</text>\n",
        left + pw + 6.0,
        left + pw + 20.0,
        left + pw + 24.0,
        ly + 4.0
    ));
    let ly = ly + 20.0;
    s.push_str(&format!(
        "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"#c00\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">C tracer (ptrace goal)</text>\n",
        left + pw + 6.0,
        left + pw + 20.0,
        left + pw + 24.0,
        ly + 4.0
    ));
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#444\">1.0 = no slowdown; higher is better</text>\n</svg>\n",
        left + pw / 2.0,
        h - 10.0
    ));
    s
}

/// Criterion's latest median estimates (ns), from its output directory.
pub fn criterion_results(dir: Option<&str>) -> Vec<(String, f64)> {
    let base = match dir {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
            .join("criterion"),
    };
    let mut out = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    let est = p.join("estimates.json");
                    if let Ok(txt) = std::fs::read_to_string(&est) {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&txt) {
                            if let Some(ns) = v["median"]["point_estimate"].as_f64() {
                                let id =
                                    d.strip_prefix(&base).map(|x| x.to_string_lossy().into_owned()).unwrap_or_default();
                                out.push((id, ns));
                            }
                        }
                    }
                } else if p.file_name().is_some_and(|n| n != "report" && n != "base" && n != "change") {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Workload names as the daemon report shows them.
fn mode_label(m: &str) -> &str {
    if m == "seq" {
        "fork"
    } else {
        m
    }
}

fn drow<'a>(d: &'a DaemonResults, variant: &str, mode: &str) -> Option<&'a DaemonRow> {
    d.rows.iter().find(|x| x.variant == variant && x.mode == mode)
}

fn dvariants(d: &DaemonResults) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for x in &d.rows {
        if !v.contains(&x.variant) {
            v.push(x.variant.clone());
        }
    }
    v
}

fn dbackends(d: &DaemonResults) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for b in d.rows.iter().filter_map(|x| x.backend.clone()) {
        if !v.contains(&b) {
            v.push(b);
        }
    }
    v
}

/// The daemon's goals: the ratios per backend, its CPU per event, the journal per VPS.
fn daemon_goals(d: &DaemonResults) -> Vec<Goal> {
    let mut g = Vec::new();
    for b in ["cnproc", "ebpf", "ptrace"] {
        let variant = format!("daemon {b}");
        let goal_text = MODES
            .iter()
            .filter_map(|m| crate::results::ratio_goal(b, m).map(|x| format!("≥ {x:.2} {}", mode_label(m))))
            .collect::<Vec<_>>()
            .join(", ");
        let goal = format!("daemon {b}: tracked/untracked ratio {goal_text}");
        if let Some((_, why)) = d.unavailable.iter().find(|x| x.0 == variant) {
            g.push(Goal { goal, result: format!("unavailable: {why}"), met: None, why: String::new() });
            continue;
        }
        let mut parts = Vec::new();
        let mut short = Vec::new();
        let mut ok = true;
        let mut measured = 0;
        for m in MODES {
            let Some(target) = crate::results::ratio_goal(b, m) else { continue };
            match drow(d, &variant, m).filter(|x| x.ratio.n > 0) {
                Some(x) => {
                    measured += 1;
                    parts.push(format!("{} {:.3}", mode_label(m), x.ratio.median));
                    if x.ratio.median < target {
                        ok = false;
                        short.push(format!(
                            "{} by {:.1} points ({:.3} vs {target:.2}; spread {:.3}–{:.3})",
                            mode_label(m),
                            (target - x.ratio.median) * 100.0,
                            x.ratio.median,
                            x.ratio.min,
                            x.ratio.max
                        ));
                    }
                }
                None => parts.push(format!("{} not measured", mode_label(m))),
            }
        }
        if measured == 0 {
            continue;
        }
        g.push(Goal {
            goal,
            result: parts.join(", "),
            met: if measured < MODES.len() && ok { None } else { Some(ok) },
            why: format!("short in {}", short.join("; ")),
        });
    }
    for b in ["cnproc", "ebpf"] {
        let variant = format!("daemon {b}");
        let xs: Vec<(String, f64)> = MODES
            .iter()
            .filter_map(|m| {
                drow(d, &variant, m)?
                    .cpu_us_per_event
                    .filter(|s| s.n > 0)
                    .map(|s| (mode_label(m).to_string(), s.median))
            })
            .collect();
        if xs.is_empty() {
            continue;
        }
        let worst = xs.iter().map(|x| x.1).fold(0.0, f64::max);
        g.push(Goal {
            goal: format!("daemon {b}: CPU ≤ {:.0} µs per event", crate::results::CPU_GOAL_US),
            result: xs.iter().map(|(m, x)| format!("{m} {x:.2} µs")).collect::<Vec<_>>().join(", "),
            met: Some(worst <= crate::results::CPU_GOAL_US),
            why: format!(
                "{:.1}× the goal at worst ({worst:.2} µs per event; the daemon's CPU from `vpstag start` to the VPS \
                 listed empty, over the workload's fork, exec and exit events)",
                worst / crate::results::CPU_GOAL_US
            ),
        });
    }
    // The journal: a VPS that forks many times should leave a handful of records.
    let mut parts = Vec::new();
    let mut worst: f64 = 0.0;
    for b in dbackends(d) {
        if let Some(x) = drow(d, &format!("daemon {b}"), "seq").and_then(|x| x.journal_records) {
            worst = worst.max(x.median);
            parts.push(format!("{b} {}", fmt_count(x.median)));
        }
    }
    if !parts.is_empty() {
        let forks = d.counts.iter().find(|x| x.0 == "seq").map_or(0, |x| x.1);
        g.push(Goal {
            goal: format!(
                "journal: a handful of records (≤ {:.0}) for a VPS that forks {} times",
                crate::results::JOURNAL_GOAL_RECORDS,
                fmt_count(forks as f64)
            ),
            result: parts.join(", "),
            met: Some(worst <= crate::results::JOURNAL_GOAL_RECORDS),
            why: format!(
                "{} records at worst for {} forks ({:.2} per fork): the journal grows with the VPS's processes, not \
                 with its VPSes",
                fmt_count(worst),
                fmt_count(forks as f64),
                if forks > 0 { worst / forks as f64 } else { f64::NAN }
            ),
        });
    }
    g
}

fn daemon_ratio_table(d: &DaemonResults, md: bool) -> String {
    let mut rows = Vec::new();
    let mut u = vec!["untracked, no daemon (ops/s)".to_string()];
    for m in MODES {
        u.push(d.untracked.iter().find(|x| x.0 == m).map(|x| rate_summary(&x.1)).unwrap_or_default());
    }
    rows.push(u);
    for v in dvariants(d) {
        let mut line = vec![v.clone()];
        for m in MODES {
            line.push(drow(d, &v, m).map(|o| fmt_summary(&o.ratio, 3)).unwrap_or_else(|| "–".into()));
        }
        rows.push(line);
        if v.starts_with("daemon ") {
            let mut line = vec![format!("{v}: bystander (not in a VPS)")];
            for m in MODES {
                line.push(
                    drow(d, &v, m).and_then(|o| o.bystander_ratio).map(|s| fmt_summary(&s, 3)).unwrap_or("–".into()),
                );
            }
            rows.push(line);
        }
    }
    let h = [
        "ratio tracked/untracked",
        "fork (fork+exit+wait)",
        "burst (fork 50, wait all)",
        "spawn (posix_spawn /bin/true)",
    ];
    table(md, &h, &rows)
}

fn daemon_cost_table(d: &DaemonResults, md: bool) -> String {
    let f = |s: Option<Summary>, digits: usize| s.map(|s| fmt_summary(&s, digits)).unwrap_or_else(|| "–".into());
    let mut rows = Vec::new();
    for b in dbackends(d) {
        let v = format!("daemon {b}");
        for m in MODES {
            let Some(x) = drow(d, &v, m) else { continue };
            let ms = |s: Option<Summary>| {
                s.map(|s| Summary { median: s.median * 1e3, min: s.min * 1e3, max: s.max * 1e3, n: s.n })
            };
            rows.push(vec![
                v.clone(),
                mode_label(m).to_string(),
                f(x.cpu_us_per_event, 2),
                f(x.net_cpu_us_per_event, 2),
                f(x.wakeups_per_event, 2),
                f(x.events_applied_per_event, 2),
                f(x.journal_bytes, 0),
                format!(
                    "{}{}",
                    f(x.journal_records, 0),
                    if x.compacted_runs > 0 {
                        format!(" ({} runs compacted: undercounts)", x.compacted_runs)
                    } else {
                        String::new()
                    }
                ),
                format!(
                    "{} ms, {}",
                    x.vps_cpu_ms.map(|s| format!("{:.2}", s.median)).unwrap_or_else(|| "–".into()),
                    x.vps_wakeups.map(|s| format!("{:.0}", s.median)).unwrap_or_else(|| "–".into())
                ),
                format!("{} / {}", x.loss_reports, x.divergences),
                f(ms(x.catch_up_secs), 0),
            ]);
        }
    }
    let h = [
        "daemon",
        "workload",
        "CPU µs per event",
        "net of a VPS's fixed cost",
        "wake-ups per event",
        "events applied per event",
        "journal bytes per VPS",
        "journal records per VPS",
        "a /bin/true VPS: CPU, wake-ups",
        "loss reports / divergences",
        "catch-up ms",
    ];
    table(md, &h, &rows)
}

fn daemon_preamble(d: &DaemonResults) -> String {
    let counts: Vec<String> =
        d.counts.iter().map(|(m, c)| format!("{} {}", mode_label(m), fmt_count(*c as f64))).collect();
    format!(
        "Each tracked run starts a fresh daemon, `{}` (state on {}), waits for it to answer `hello`, starts the workload \
         with `vpstag start NAME -- vpstag-bench work ...`, reads the workload's own timing once the VPS's first process \
         has ended and the daemon lists the VPS empty, runs the same workload once more outside any VPS (the *bystander* \
         row: what a host-wide listener costs everyone else), then stops the daemon (SIGTERM) and removes its directory. \
         The untracked runs the ratios compare with run with no daemon at all, alternating with the tracked runs (ABAB…): \
         ratio = tracked rate / mean of the untracked rates just before and after. Processes per run: {}; rounds: {}. \
         Workloads pinned to CPU {}; the daemon, strace and the C tracer {}. Daemon CPU: `clock_getcpuclockid` of the \
         daemon (all threads) from just before `vpstag start` to the VPS listed empty, per workload event (fork and exit \
         per process, exec too for spawn); wake-ups: voluntary + involuntary context switches of its threads \
         (/proc/PID/task/*/status; a thread that ended within the span is not counted) over the same span. Both include the fixed cost of a VPS (`vpstag start`'s \
         requests, registering, the bench's questions), measured in the same daemon with a VPS running /bin/true just \
         before and shown apart (*net*: without it). Journal: bytes and lines the run added to the state directory. \
         Events applied per event above 1: the backend also saw the host's other processes. For scale, the same \
         workload under `strace -f -o /dev/null` and under a minimal C tracer (`bench/c/seize_tracer.c`: PTRACE_SEIZE \
         with fork, vfork, clone, exec and exit events like vpstag's ptrace backend, resuming every stop and nothing \
         else; built with `cc -O2` at run time). Load average before/after: \
         {} / {}.\n",
        d.daemon_command,
        d.state_fs,
        counts.join(", "),
        d.rounds,
        d.pin_cpu,
        if d.daemon_cpu == "none" { "not pinned (as deployed)".to_string() } else { format!("pinned to CPU {}", d.daemon_cpu) },
        d.load_before,
        d.load_after
    )
}

/// A warning per workload whose untracked rates spread over more than 20% of their median: the
/// machine was busy, and ratios are not to be trusted to better than that.
fn daemon_noise(d: &DaemonResults) -> Vec<String> {
    d.untracked
        .iter()
        .filter(|(_, s)| s.n > 1 && s.median > 0.0 && (s.max - s.min) / s.median > 0.2)
        .map(|(m, s)| {
            format!(
                "untracked {} rates ranged {}–{}/s, {:.0}% of their median ({}/s): the machine was busy; ratios here \
                 are not better than that",
                mode_label(m),
                fmt_count(s.min),
                fmt_count(s.max),
                (s.max - s.min) / s.median * 100.0,
                fmt_count(s.median)
            )
        })
        .collect()
}

/// The daemon's report for the terminal (`vpstag-bench daemon`).
pub fn daemon_text(d: &DaemonResults) -> String {
    let mut s = String::new();
    s.push_str(&format!("command: {}\n", d.command));
    s.push_str(&format!(
        "vpstag-bench daemon: the daemon as deployed, {} ({:.0} s); {} ({}), built with `{}`\n\n",
        d.date, d.elapsed, d.vpstag, d.vpstag_version, d.build
    ));
    s.push_str(&daemon_preamble(d));
    s.push('\n');
    let g = daemon_goals(d);
    if !g.is_empty() {
        let rows: Vec<Vec<String>> =
            g.iter().map(|x| vec![x.goal.clone(), x.result.clone(), met(x.met).replace("**", "")]).collect();
        s.push_str(&text_table(&["goal", "result (medians)", ""], &rows));
        s.push('\n');
    }
    s.push_str(&daemon_ratio_table(d, false));
    s.push('\n');
    s.push_str(&daemon_cost_table(d, false));
    s.push('\n');
    for (n, why) in &d.unavailable {
        s.push_str(&format!("not measured: {n}: {why}\n"));
    }
    for f in &d.failures {
        s.push_str(&format!("failed: {f}\n"));
    }
    for w in daemon_noise(d) {
        s.push_str(&format!("warning: {w}\n"));
    }
    s
}

/// The daemon's section of BENCHMARKS.md.
fn daemon_markdown(d: &DaemonResults) -> String {
    let mut s = String::from("## 7. The daemon as deployed\n\n");
    s.push_str(&format!("Measured by `{}` ({:.0} s).\n\n", d.command, d.elapsed));
    s.push_str(&daemon_preamble(d));
    s.push('\n');
    s.push_str(&daemon_ratio_table(d, true));
    s.push('\n');
    s.push_str(&daemon_cost_table(d, true));
    s.push('\n');
    for (n, why) in &d.unavailable {
        s.push_str(&format!("- Not measured: **{n}**: {why}.\n"));
    }
    for f in &d.failures {
        s.push_str(&format!("- Failed: {f}\n"));
    }
    let noise = daemon_noise(d);
    for w in &noise {
        s.push_str(&format!("- Warning: {w}.\n"));
    }
    if !d.unavailable.is_empty() || !d.failures.is_empty() || !noise.is_empty() {
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summarize;

    fn row(backend: &str, mode: &str, ratio: f64, cpu_us: f64) -> DaemonRow {
        DaemonRow {
            variant: format!("daemon {backend}"),
            backend: Some(backend.into()),
            mode: mode.into(),
            ratio: summarize(&[ratio]),
            cpu_us_per_event: Some(summarize(&[cpu_us])),
            journal_records: Some(summarize(&[6.0])),
            ..Default::default()
        }
    }

    fn results() -> DaemonResults {
        let mut d = DaemonResults { counts: vec![("seq".into(), 10_000)], ..Default::default() };
        for m in MODES {
            d.rows.push(row("cnproc", m, 0.98, 1.5));
        }
        d.rows.push(row("ptrace", "seq", 0.29, 40.0));
        d.rows.push(row("ptrace", "burst", 0.45, 40.0));
        d.rows.push(row("ptrace", "spawn", 0.85, 40.0));
        d.unavailable.push(("daemon ebpf".into(), "not built in".into()));
        d
    }

    fn goal<'a>(g: &'a [Goal], starts: &str) -> &'a Goal {
        g.iter().find(|x| x.goal.starts_with(starts)).unwrap()
    }

    #[test]
    fn daemon_goals_are_met_missed_or_not_measured() {
        let g = daemon_goals(&results());
        assert_eq!(goal(&g, "daemon cnproc: tracked").met, Some(true));
        let p = goal(&g, "daemon ptrace: tracked");
        assert_eq!(p.met, Some(false));
        assert!(p.why.contains("fork by 1.0 points"), "{}", p.why);
        assert!(!p.why.contains("burst"), "{}", p.why);
        assert_eq!(goal(&g, "daemon ebpf: tracked").met, None);
        assert!(goal(&g, "daemon ebpf: tracked").result.starts_with("unavailable"));
        assert_eq!(goal(&g, "daemon cnproc: CPU").met, Some(true));
        assert!(!g.iter().any(|x| x.goal.starts_with("daemon ebpf: CPU")));
        assert_eq!(goal(&g, "journal").met, Some(true));
    }

    #[test]
    fn a_goal_just_below_its_threshold_is_missed() {
        let mut d = results();
        d.rows[2].ratio = summarize(&[0.969]);
        d.rows[0].cpu_us_per_event = Some(summarize(&[2.01]));
        let g = daemon_goals(&d);
        assert_eq!(goal(&g, "daemon cnproc: tracked").met, Some(false));
        assert_eq!(goal(&g, "daemon cnproc: CPU").met, Some(false));
    }

    #[test]
    fn daemon_report_names_the_command_first() {
        let mut d = results();
        d.command = "vpstag-bench daemon --count 100".into();
        let t = daemon_text(&d);
        assert!(t.starts_with("command: vpstag-bench daemon --count 100\n"), "{t}");
        assert!(t.contains("not measured: daemon ebpf: not built in"));
        assert!(!t.contains("warning:"));
        d.untracked.push(("seq".into(), summarize(&[5000.0, 8000.0, 8100.0])));
        d.untracked.push(("burst".into(), summarize(&[8000.0, 8100.0, 8200.0])));
        let t = daemon_text(&d);
        assert!(t.contains("warning: untracked fork rates ranged 5\u{202f}000–8\u{202f}100/s"), "{t}");
        assert!(!t.contains("untracked burst rates"), "{t}");
    }
}
