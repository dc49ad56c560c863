"""Autoscaling per tier under a stepped load: Locust with `load/step_shape.py` against a deployment
whose tiers autoscale (`deployments/serve_config.yaml`), the replicas per tier read from `/v1/info`
every `--poll` seconds beside Locust's per-second rps and 10-second p50; writes autoscale.json,
autoscale.md and autoscale.png to `--out`.

    dimee cluster up && serve deploy deployments/serve_config.yaml   # args.artifact: an absolute path
    python -m load.autoscale --mode cloud_only --steps 60:2,240:8,420:2 --out runs/autoscale
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import threading
import time
from pathlib import Path

from load.client import DEFAULT_URL, LOCUSTFILE, MODES, LocustOptions, is_shed, locust_command
from load.run import served_replicas

SHAPE = Path(__file__).with_name("step_shape.py")


def parse_steps(text: str) -> list[tuple[float, int]]:
    """"END:USERS,..." -> [(end second, users)], ends increasing; ValueError naming the bad part."""
    steps = []
    for part in text.split(","):
        end, sep, users = part.partition(":")
        try:
            steps.append((float(end), int(users)))
        except ValueError:
            raise ValueError(f"--steps: {part!r} is not END_SECOND:USERS") from None
        if not sep or steps[-1][1] < 1 or (len(steps) > 1 and steps[-1][0] <= steps[-2][0]):
            raise ValueError(f"--steps: {part!r} needs users >= 1 and an end after the previous step's")
    return steps


def poll_replicas(host: str, every_s: float, stop: threading.Event, out: list[dict]) -> None:
    """Replicas per tier with the Unix time they were read at (`t`, made relative to Locust's start later)."""
    while not stop.is_set():
        replicas = served_replicas(host)
        if replicas is not None:
            out.append({"t": time.time(), **replicas})
        stop.wait(every_s)


def history(path: Path) -> tuple[int, list[dict]]:
    """Locust's start (Unix time) and per-second history of all requests: seconds since start, users,
    rps, p50 (last 10 s)."""
    rows = [r for r in csv.DictReader(path.open()) if r["Name"] == "Aggregated"]
    start = int(rows[0]["Timestamp"])
    return start, [{"t": int(r["Timestamp"]) - start, "users": int(r["User Count"]), "rps": float(r["Requests/s"]),
             "p50_ms": float(r["50%"]) if r["50%"] not in ("N/A", "") else None} for r in rows]


def totals(path: Path) -> dict:
    """Requests, failures and 503 refusals (counted apart by the locustfile) over the whole run."""
    rows = list(csv.DictReader(path.open()))
    shed = sum(int(r["Request Count"]) for r in rows if is_shed(r["Name"]))
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    return {"requests": int(agg["Request Count"]) - shed, "failures": int(agg["Failure Count"]), "shed_503": shed}


def assess(steps: list[tuple[float, int]], seconds: list[dict], replicas: list[dict]) -> dict:
    """Per tier: when it scaled up and back down; the median p50 before the load rose, and from a
    minute after the tier scaled up until the load fell (target: at most twice the first)."""
    tiers = [k for k in replicas[0] if k != "t"]
    first = {t: replicas[0][t] for t in tiers}
    out = {"tiers": {}}
    rise, fall = steps[0][0], steps[-2][0]
    quiet = sorted(s["p50_ms"] for s in seconds if 10 <= s["t"] < rise and s["p50_ms"])
    out["p50_before_ms"] = quiet[len(quiet) // 2] if quiet else None
    for tier in tiers:
        up = next((r["t"] for r in replicas if r[tier] > first[tier]), None)
        down = next((r["t"] for r in replicas if up is not None and r["t"] > max(up, fall)
                     and r[tier] == first[tier]), None)
        out["tiers"][tier] = {"first": first[tier], "max": max(r[tier] for r in replicas), "scaled_up_at_s": up,
                              "back_down_at_s": down}
        if up is not None:  # p50 under the load before the tier scaled up, and from a minute after
            for key, lo, hi in (("p50_before_up_ms", rise + 5, up), ("p50_from_60s_after_up_ms", up + 60, fall)):
                window = sorted(s["p50_ms"] for s in seconds if lo <= s["t"] < hi and s["p50_ms"] is not None)
                out["tiers"][tier][key] = window[len(window) // 2] if window else None
    return out


def plot(seconds: list[dict], replicas: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    a.plot([s["t"] for s in seconds], [s["rps"] for s in seconds], label="requests/s")
    a.plot([s["t"] for s in seconds], [s["users"] for s in seconds], label="users", linestyle="--")
    b.plot([s["t"] for s in seconds if s["p50_ms"]], [s["p50_ms"] for s in seconds if s["p50_ms"]])
    for tier in (k for k in replicas[0] if k != "t"):
        c.step([r["t"] for r in replicas], [r[tier] for r in replicas], where="post", label=tier)
    a.set_ylabel("rps / users")
    b.set_ylabel("p50 ms (last 10 s)")
    c.set_ylabel("running replicas")
    c.set_xlabel("seconds")
    for ax in (a, c):
        ax.legend(fontsize=8)
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


def markdown(report: dict) -> str:
    a = report["assessment"]
    lines = [f"# Autoscaling run: {report['mode']}, steps {report['steps']}, think time {report['think_time']} s",
             "", f"requests {report['totals']['requests']}, failed {report['totals']['failures']}, "
                 f"503 {report['totals']['shed_503']}; p50 before the load rose: {a['p50_before_ms']} ms", "",
             "| tier | replicas at start | max | scaled up at (s) | p50 before, ms | p50 from 60 s after, ms "
             "| back down at (s) |", "|---|---|---|---|---|---|---|"]
    for tier, t in a["tiers"].items():
        lines.append(f"| {tier} | {t['first']} | {t['max']} | {_s(t['scaled_up_at_s'])} | "
                     f"{t.get('p50_before_up_ms', '-')} | {t.get('p50_from_60s_after_up_ms', '-')} | "
                     f"{_s(t['back_down_at_s'])} |")
    lines += ["", "| second | users | rps | p50 ms | " + " | ".join(a["tiers"]) + " |",
              "|---|---|---|---|" + "---|" * len(a["tiers"])]
    for s in report["seconds"][::10]:
        now = [r for r in report["replicas"] if r["t"] <= s["t"]] or report["replicas"][:1]
        lines.append(f"| {s['t']} | {s['users']} | {s['rps']:.1f} | {s['p50_ms']} | "
                     + " | ".join(str(now[-1][t]) for t in a["tiers"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=DEFAULT_URL)
    p.add_argument("--mode", default="cloud_only", choices=MODES)
    p.add_argument("--steps", default="60:2,240:8,420:2", help="END_SECOND:USERS,... (load/step_shape.py)")
    p.add_argument("--think-time", type=float, default=0.0)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--dataset", default="rt-polarity")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between two readings of the replicas")
    p.add_argument("--out", type=Path, default=Path("runs/autoscale"))
    args = p.parse_args(argv)
    try:
        steps = parse_steps(args.steps)
    except ValueError as err:
        p.error(str(err))
    if len(steps) < 3:
        p.error("--steps needs at least three steps: before, during and after the load")
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "locust"
    options = LocustOptions(args.host, args.texts_per_request, args.dataset, args.think_time)
    command = locust_command(options, args.mode, ["--csv", str(prefix), "--csv-full-history", "--steps", args.steps],
                             (LOCUSTFILE, SHAPE))
    replicas, stop = [], threading.Event()
    poller = threading.Thread(target=poll_replicas, args=(args.host, args.poll, stop, replicas))
    poller.start()
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        stop.set()
        poller.join()
    if done.returncode not in (0, 1):
        raise SystemExit(f"locust exited with {done.returncode}:\n{done.stderr[-2000:]}")
    if not replicas:
        raise SystemExit(f"{args.host}/v1/info never answered: is the service up?")
    start, seconds = history(Path(f"{prefix}_stats_history.csv"))
    replicas = [r | {"t": r["t"] - start} for r in replicas]  # on Locust's clock
    report = {"mode": args.mode, "steps": args.steps, "think_time": args.think_time,
              "totals": totals(Path(f"{prefix}_stats.csv")), "seconds": seconds, "replicas": replicas}
    report["assessment"] = assess(steps, seconds, replicas)
    (args.out / "autoscale.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "autoscale.md").write_text(markdown(report))
    plot(seconds, replicas, args.out / "autoscale.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
