"""Load-test `dimee` against `cloud_only` on a running cluster with Locust (headless), same users,
spawn rate and duration for each, and write a report directory: report.json, report.md, report.png
and runs.json (every run of every repeat).

    python -m load.run --host http://127.0.0.1:8000 --users 16 --duration 60 --repeat 2 --out runs/load
    python -m load.run --host ... --sweep 2,4,8,16,32 --p99-limit-ms 1000 --out runs/sweep

`rps_ratio` is dimee's requests per second over cloud_only's (median of the per-repeat ratios;
the two modes alternate order between repeats so drift of the machine hits both alike), and
`rps_ratio_ceiling` is cloud_only's layers per request over dimee's: the ratio if only layer
compute cost anything.

A comparison is only fair when neither mode is flattered by timeouts: answers that came by
fallback or degraded are counted per mode (`fallback_or_degraded`), and a mode above 1% is
named in `unfair`. Requests refused with 503 and Retry-After (the cluster at capacity; the Locust
users wait as told) are counted apart as `shed`, with their own p99, neither answers nor
failures. The replicas per tier (from `/v1/info`) are part of the report: give cloud_only
as many cloud replicas as the cores allow (`dimee up --cloud-replicas 2` on the local cluster).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import requests

from deployments import local_cluster
from dimee_models.tiers import TIER_NAMES, Tier
from load.client import DEFAULT_URL, INFO, LocustOptions, is_shed, locust_command

COMPARED = ("dimee", "cloud_only")  # the modes a load test compares
LATENCY = ("p50_ms", "p95_ms", "p99_ms")
FAIR_SHARE = 0.01  # most fallback-or-degraded answers a mode may have for the comparison to count
# process-name fragment -> part of the serving path it belongs to (first match wins); a raylet
# (which also runs its node's object store) is counted per node of the local cluster
PARTS = ((Tier.MOBILE.deployment, "ingress_mobile"), (Tier.EDGE.deployment, "edge"), (Tier.CLOUD.deployment, "cloud"),
         ("ProxyActor", "proxy"), ("haproxy", "proxy"), ("HAProxy", "proxy"), ("raylet", "raylet"),
         ("gcs_server", "ray_gcs"), ("log_monitor", "ray_log_monitor"), ("ray", "ray_other"))
RAYLET_NODE = {f"--node_ip_address={node.ip}": f"raylet_{node.tier.label}" for node in local_cluster.DEFAULT_NODES}


def cpu_by_part() -> dict[str, float]:
    """CPU seconds used so far by each part of a cluster running on this machine, and by the
    Locust subprocesses that have finished (this process's reaped children)."""
    used = {"locust": sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        times = proc.info["cpu_times"]
        part = next((name for fragment, name in PARTS if fragment in cmdline), None)
        if part == "raylet":
            part = next((name for flag, name in RAYLET_NODE.items() if flag in cmdline.split()), "raylet_head")
        if part and times:
            used[part] = used.get(part, 0.0) + times.user + times.system
    return used


def percentiles(entries: list[dict], qs: dict[str, float]) -> dict[str, float | None]:
    """Latency percentiles over the merged response-time histograms of Locust stats entries."""
    histogram: dict[float, int] = {}
    for entry in entries:
        for ms, count in entry["response_times"].items():
            histogram[float(ms)] = histogram.get(float(ms), 0) + count
    if not histogram:
        return dict.fromkeys(qs)
    times, counts = zip(*sorted(histogram.items()))
    cumulative = np.cumsum(counts)
    return {k: times[int(np.searchsorted(cumulative, q * cumulative[-1]))] for k, q in qs.items()}


def parse_stats(path: Path) -> dict:
    """Totals of Locust's `--json-file` stats (written once the run has stopped, unlike its CSV,
    which is refreshed every second and can miss the last requests). Requests refused with 503
    and Retry-After (`shed`) count apart: neither answers (rps, latency) nor failures."""
    entries = json.loads(Path(path).read_text())
    if not entries:
        raise ValueError(f"{path} has no stats: did Locust send any request?")
    answered = [e for e in entries if not is_shed(e["name"])]
    shed = [e for e in entries if is_shed(e["name"])]
    requests = sum(e["num_requests"] for e in answered)
    seconds = max(e["last_request_timestamp"] for e in entries) - min(e["start_time"] for e in entries)
    return {"rps": requests / seconds, **percentiles(answered, {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}),
            "max_ms": max((e["max_response_time"] for e in answered), default=None),
            "requests": requests, "failures": sum(e["num_failures"] for e in entries),
            "shed": sum(e["num_requests"] for e in shed),
            **percentiles(shed, {"shed_p50_ms": 0.5, "shed_p99_ms": 0.99})}


def parse_tiers(path: Path) -> dict:
    """Answering-tier fractions and mean exit layer from the locustfile's `--tier-stats` file."""
    seen = json.loads(Path(path).read_text())
    n = max(seen["predictions"], 1)
    return {"tier_fraction": {t: seen["tiers"].get(t, 0) / n for t in TIER_NAMES},
            "mean_layers": seen["layers"] / n, "fallback_or_degraded": (seen["fallback"] + seen["degraded"]) / n}


def run_locust(options: LocustOptions, mode: str, users: int, seconds: float, prefix: Path) -> dict:
    """One headless Locust run; its stats and tier counts."""
    command = locust_command(options, mode, ["-u", str(users), "-r", str(users), "-t", f"{seconds:g}s",
                                             "--stop-timeout", "10", "--csv", str(prefix), "--json-file", str(prefix),
                                             "--tier-stats", f"{prefix}_tiers.json"])
    before = cpu_by_part() if options.cpu_breakdown else None
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1 only means some requests failed; the stats say how many
        raise RuntimeError(f"locust exited with {done.returncode}:\n{done.stderr[-2000:]}")
    run = {"mode": mode, "users": users, "seconds": seconds,
           **parse_stats(Path(f"{prefix}.json")), **parse_tiers(Path(f"{prefix}_tiers.json"))}
    if before is not None:
        after = cpu_by_part()
        run["cpu_ms_per_request"] = {part: (after[part] - before.get(part, 0.0)) * 1000 / max(run["requests"], 1)
                                     for part in after}
    return run


def summarize(runs: list[dict], replicas: dict[str, int] | None = None) -> dict:
    """report.json: per mode the median of each repeat's rates and percentiles, totals of
    requests and failures, tier fractions and fallback-or-degraded share over all answers; then
    the ratios, the modes whose fallback-or-degraded share makes the comparison unfair, and the
    replicas per tier."""
    report = {}
    for mode in COMPARED:
        mine = [r for r in runs if r["mode"] == mode]
        requests = sum(r["requests"] for r in mine)
        report[mode] = {
            **{k: statistics.median(r[k] for r in mine) for k in ("rps",) + LATENCY},
            "requests": requests, "failures": sum(r["failures"] for r in mine),
            "shed": sum(r["shed"] for r in mine),  # 503 with Retry-After: the cluster was at capacity
            "shed_p99_ms": max((r["shed_p99_ms"] for r in mine if r["shed"]), default=None),
            "tier_fraction": {t: sum(r["tier_fraction"][t] * r["requests"] for r in mine) / max(requests, 1)
                              for t in TIER_NAMES},
            "mean_layers": sum(r["mean_layers"] * r["requests"] for r in mine) / max(requests, 1),
            "fallback_or_degraded": sum(r["fallback_or_degraded"] * r["requests"] for r in mine) / max(requests, 1),
        }
    report["rps_ratio"] = statistics.median(per_repeat_ratios(runs))
    report["rps_ratio_ceiling"] = report["cloud_only"]["mean_layers"] / report["dimee"]["mean_layers"]
    report["unfair"] = [m for m in COMPARED if max(r["fallback_or_degraded"] for r in runs if r["mode"] == m) > FAIR_SHARE]
    report["replicas"] = replicas
    return report


def per_repeat_ratios(runs: list[dict]) -> list[float]:
    by_repeat = {}
    for r in runs:
        by_repeat.setdefault(r["repeat"], {})[r["mode"]] = r["rps"]
    return [pair["dimee"] / pair["cloud_only"] for pair in by_repeat.values()]


def markdown(report: dict, runs: list[dict], args) -> str:
    ratios = per_repeat_ratios(runs)
    lines = [
        "# Load test: dimee vs cloud_only", "",
        f"{args.users} users (spawned at once), {args.duration:g} s per mode after a {args.warmup:g} s warm-up, "
        f"{args.texts_per_request} text(s) per request from the {args.dataset} test split, "
        f"think time {args.think_time:g} s, {args.repeat} repeat(s), against {args.host}; replicas per tier: "
        f"{report['replicas']}.", "",
        "| mode | rps | p50 ms | p95 ms | p99 ms | requests | failures | shed (503) | shed p99 ms | mobile | edge "
        "| cloud | mean layers | fallback or degraded (worst run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in COMPARED:
        r = report[mode]
        f = r["tier_fraction"]
        lines.append(f"| {mode} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['requests']} | {r['failures']} | {r['shed']} | "
                     f"{'-' if r['shed_p99_ms'] is None else round(r['shed_p99_ms'])} | {f['mobile']:.1%} | {f['edge']:.1%} | {f['cloud']:.1%} | "
                     f"{r['mean_layers']:.2f} | {max(x['fallback_or_degraded'] for x in runs if x['mode'] == mode):.1%} |")
    lines += ["", f"rps_ratio (dimee / cloud_only): **{report['rps_ratio']:.2f}** "
              f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"ceiling from layers: {report['rps_ratio_ceiling']:.2f}; "
              f"ratio / ceiling: {report['rps_ratio'] / report['rps_ratio_ceiling']:.0%}."]
    if report["unfair"]:
        lines += ["", f"**Not a fair comparison:** more than {FAIR_SHARE:.0%} of the answers of "
                  f"{', '.join(report['unfair'])} came by fallback or degraded in some run (a tier timed out)."]
    if "cpu_ms_per_request" in runs[0]:
        lines += ["", "CPU ms per request by process (median over repeats):", ""] + cpu_table(runs)
    lines += ["", "Every run:", ""]
    lines += [f"- repeat {r['repeat']} {r['mode']}: {r['rps']:.1f} rps, p50 {r['p50_ms']:.0f} ms, "
              f"p99 {r['p99_ms']:.0f} ms, {r['failures']} failures, {r['shed']} shed" for r in runs]
    return "\n".join(lines) + "\n"


def cpu_table(runs: list[dict]) -> list[str]:
    parts = sorted(runs[0]["cpu_ms_per_request"], key=lambda k: -runs[0]["cpu_ms_per_request"][k])
    lines = ["| mode | " + " | ".join(parts) + " | total |", "|---|" + "---|" * (len(parts) + 1)]
    for mode in COMPARED:
        cpu = {k: statistics.median(r["cpu_ms_per_request"].get(k, 0.0) for r in runs if r["mode"] == mode)
               for k in parts}
        lines.append(f"| {mode} | " + " | ".join(f"{cpu[k]:.1f}" for k in parts) + f" | {sum(cpu.values()):.1f} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.35
    for i, mode in enumerate(COMPARED):
        lat.bar([x + i * width for x in range(len(LATENCY))], [report[mode][k] for k in LATENCY], width, label=mode)
    lat.set_xticks([x + width / 2 for x in range(len(LATENCY))], [k.removesuffix("_ms") for k in LATENCY])
    lat.set_ylabel("latency (ms)")
    lat.legend()
    thr.bar(COMPARED, [report[m]["rps"] for m in COMPARED], color=["C0", "C1"])
    thr.set_ylabel("requests / s")
    thr.set_title(f"ratio {report['rps_ratio']:.2f} (ceiling {report['rps_ratio_ceiling']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(args, options: LocustOptions) -> dict:
    """Throughput and p99 per user count; the highest rps whose p99 stays within the limit."""
    out = {mode: [] for mode in COMPARED}
    for users in args.sweep:
        for mode in COMPARED:
            if args.warmup:
                run_locust(options, mode, users, args.warmup, args.out / f"warmup-{mode}-{users}")
            r = run_locust(options, mode, users, args.duration, args.out / f"sweep-{mode}-{users}")
            keep = ("users", "rps", "p50_ms", "p99_ms", "failures", "shed", "shed_p99_ms", "fallback_or_degraded")
            out[mode].append({k: r[k] for k in keep})
            print(f"{users:4d} users {mode:>10}: {r['rps']:.1f} rps, p99 {r['p99_ms']:.0f} ms, "
                  f"{r['shed']} shed", flush=True)
    out["max_rps_within_p99_limit"] = {
        mode: max((p for p in out[mode] if p["p99_ms"] <= args.p99_limit_ms and not p["failures"]),
                  key=lambda p: p["rps"], default=None)
        for mode in COMPARED
    }
    out["p99_limit_ms"] = args.p99_limit_ms
    return out


def served_replicas(host: str) -> dict[str, int] | None:
    """Replicas per tier, as the service reports them (None if it does not say)."""
    try:
        return requests.get(f"{host}{INFO}", timeout=30).json().get("replicas")
    except (requests.RequestException, ValueError):
        return None


def user_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep wants comma-separated user counts, got {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"--sweep user counts must be positive, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=DEFAULT_URL, help="the service's base URL")
    p.add_argument("--users", type=int, default=16, help="concurrent Locust users (all spawned at once)")
    p.add_argument("--duration", type=float, default=60, help="seconds measured per mode (and per sweep point)")
    p.add_argument("--warmup", type=float, default=5, help="seconds of unmeasured load before each measured run")
    p.add_argument("--repeat", type=int, default=1, help="run the pair of modes this many times")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--think-time", type=float, default=0.0, help="mean seconds a user waits between requests")
    p.add_argument("--dataset", default="rt-polarity", help="texts come from this dataset's test split")
    p.add_argument("--sweep", type=user_counts, default=None, metavar="U1,U2,..",
                   help="instead of the comparison, sweep these user counts and write sweep.json")
    p.add_argument("--p99-limit-ms", type=float, default=1000, help="with --sweep: the p99 latency limit")
    p.add_argument("--cpu-breakdown", action="store_true",
                   help="the cluster runs on this machine: also report CPU ms per request by process")
    p.add_argument("--out", type=Path, required=True, help="report directory (created)")
    args = p.parse_args(argv)
    for flag in ("users", "repeat", "texts_per_request"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.duration <= 0 or args.warmup < 0 or args.think_time < 0:
        p.error("--duration must be positive; --warmup and --think-time not negative")
    args.out.mkdir(parents=True, exist_ok=True)
    options = LocustOptions(args.host, args.texts_per_request, args.dataset, args.think_time,
                            cpu_breakdown=args.cpu_breakdown)

    if args.sweep:
        result = sweep(args, options)
        (args.out / "sweep.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["max_rps_within_p99_limit"], indent=2))
        return 0

    runs = []
    for repeat in range(args.repeat):
        for mode in COMPARED if repeat % 2 == 0 else COMPARED[::-1]:
            if args.warmup:
                run_locust(options, mode, args.users, args.warmup, args.out / f"warmup-{mode}")
            run = run_locust(options, mode, args.users, args.duration, args.out / f"{mode}-{repeat}")
            runs.append({"repeat": repeat, **run})
            print(f"repeat {repeat} {mode:>10}: {run['rps']:.1f} rps, p50 {run['p50_ms']:.0f} ms, "
                  f"p99 {run['p99_ms']:.0f} ms, {run['failures']} failures, {run['shed']} shed", flush=True)
    report = summarize(runs, served_replicas(args.host))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "runs.json").write_text(json.dumps(runs, indent=2))
    (args.out / "report.md").write_text(markdown(report, runs, args))
    plot(report, args.out / "report.png")
    print((args.out / "report.md").read_text())
    return 1 if any(report[m]["failures"] for m in COMPARED) else 0


if __name__ == "__main__":
    sys.exit(main())
