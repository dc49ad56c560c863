"""What shadow checks cost served throughput: Locust on mode dimee, with the Router's shadow_rate
switched live (`serve deploy` of the same config with only that field changed: no replica
restarts) between the rate under test and 0, in alternating order, so the machine's drift hits
both alike. Reports each round's rps ratio (with / without) and their median.

Reproduce (a local cluster; the tool deploys the Serve config file itself):
    dimee cluster up
    python -m load.shadow_overhead --config docs/results/live-risk/serve_config.yaml --users 8 --duration 45 \\
        --rounds 2 --texts-per-request 1 --out runs/shadow-overhead-1
    dimee down
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import yaml

from deployments.local_cluster import DASHBOARD_PORT, HEAD_IP, ray_cli
from load.client import DEFAULT_URL, INFO, LocustOptions
from load.run import run_locust


def deploy(config: dict, shadow_rate: float, url: str, dashboard: str) -> None:
    """The config with the Router's shadow_rate set, deployed; returns once /v1/info serves it."""
    router = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Router")
    router.setdefault("user_config", {})["shadow_rate"] = shadow_rate
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        subprocess.run([ray_cli("serve"), "deploy", "--address", dashboard, f.name], check=True, capture_output=True,
                       timeout=120)
    deadline = time.time() + 300  # the first deploy starts every replica
    while time.time() < deadline:
        try:
            if requests.get(f"{url}{INFO}", timeout=10).json()["shadow_rate"] == shadow_rate:
                return
        except (requests.RequestException, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"shadow_rate {shadow_rate} not served within 300 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="the Serve config file the app was deployed with")
    p.add_argument("--host", default=DEFAULT_URL)
    p.add_argument("--dashboard", default=f"http://{HEAD_IP}:{DASHBOARD_PORT}", help="the Ray dashboard serve deploy uses")
    p.add_argument("--shadow-rate", type=float, default=0.02, help="the rate under test (against 0)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--duration", type=float, default=45, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (order alternates)")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--think-time", type=float, default=0.0)
    p.add_argument("--dataset", default="rt-polarity")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.config.is_file():
        p.error(f"--config: no such file: {args.config}")
    config = yaml.safe_load(args.config.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    options = LocustOptions(args.host, args.texts_per_request, args.dataset, args.think_time)
    runs = []
    for round_ in range(args.rounds):
        rates = (args.shadow_rate, 0.0) if round_ % 2 == 0 else (0.0, args.shadow_rate)
        for rate in rates:
            deploy(config, rate, args.host, args.dashboard)
            prefix = args.out / f"r{round_}_shadow{rate:g}"
            run_locust(options, "dimee", args.users, args.warmup, args.out / f"warmup_r{round_}_{rate:g}")
            run = run_locust(options, "dimee", args.users, args.duration, prefix)
            info = requests.get(f"{args.host}{INFO}", timeout=30).json()  # one ingress replica's counts
            run.update(round=round_, shadow_rate=rate, live_risk=info["live_risk"], shadow_checks=info["shadow_checks"])
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("round", "shadow_rate", "rps", "p50_ms", "failures",
                                                  "shadow_checks")}), flush=True)
    ratios = [next(r["rps"] for r in runs if r["round"] == i and r["shadow_rate"] > 0)
              / next(r["rps"] for r in runs if r["round"] == i and r["shadow_rate"] == 0) for i in range(args.rounds)]
    report = {"shadow_rate": args.shadow_rate, "users": args.users, "texts_per_request": args.texts_per_request,
              "duration_s": args.duration, "ratios": ratios, "rps_ratio": statistics.median(ratios),
              "failures": sum(r["failures"] for r in runs), "runs": runs}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("ratios", "rps_ratio", "failures")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
