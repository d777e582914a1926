#!/usr/bin/env python3
"""What vpstag's Manager over the eBPF backend costs a fork-heavy workload, end to end.

Runs `vpstag-bench work` (pinned to CPU 1) untracked and under `vpstag-bench track --backend
ebpf` of one or more builds, interleaved in rounds (A B C A B C ...), and prints per build and
workload the median rate, the ratio of medians and the median of each round's ratio (a round's
runs are neighbours in time, so they share the machine's noise), and the tracker's CPU and
wake-ups per event.

    cargo build --release -p vpstag-bench --features ebpf
    sudo python3 backends/ebpf/examples/daemon_overhead.py \
        --bench new=target/release/vpstag-bench [--bench old=/path/to/old/vpstag-bench] \
        [--count 3000] [--rounds 9] [--modes seq,burst]
"""

import argparse
import json
import statistics
import subprocess


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="append", required=True, help="NAME=PATH of a vpstag-bench")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--modes", default="seq,burst")
    a = ap.parse_args()
    benches = [b.split("=", 1) for b in a.bench]
    plain_bench = benches[0][1]
    with open("/proc/loadavg") as f:
        print("load average:", " ".join(f.read().split()[:3]))
    print(f"{'build':<8} {'mode':<6} {'untracked/s':>12} {'tracked/s':>10} {'ratio':>6} {'pairs':>6} "
          f"{'cpu/ev':>8} {'wake/ev':>8}")
    for mode in a.modes.split(","):
        work = ["work", "--mode", mode, "--count", str(a.count), "--cpu", "1"]
        plain, tracked = [], {name: [] for name, _ in benches}
        cost = {name: [] for name, _ in benches}
        for _ in range(a.rounds):
            plain.append(run([plain_bench] + work)[0]["rate"])
            for name, path in benches:
                rate, track = run([path, "track", "--backend", "ebpf", "--", path] + work)
                tracked[name].append(rate["rate"])
                cost[name].append((track["tracker_cpu"], track["wakeups"], track["events"], track["lost_events"]))
        for name, _ in benches:
            pairs = [t / p for p, t in zip(plain, tracked[name])]
            events = sum(c[2] for c in cost[name]) or 1
            cpu = sum(c[0] for c in cost[name]) / events * 1e6
            wakes = sum(c[1] for c in cost[name]) / events
            lost = sum(c[3] for c in cost[name])
            print(f"{name:<8} {mode:<6} {statistics.median(plain):>12.0f} {statistics.median(tracked[name]):>10.0f} "
                  f"{statistics.median(tracked[name]) / statistics.median(plain):>6.3f} {statistics.median(pairs):>6.3f} "
                  f"{cpu:>6.2f}us {wakes:>8.3f}" + (f"  LOST {lost}" if lost else ""))
    with open("/proc/loadavg") as f:
        print("load average:", " ".join(f.read().split()[:3]))


if __name__ == "__main__":
    main()
