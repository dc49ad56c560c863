"""Predicted against measured mean latency of one-text requests, per mode: the prediction is the
cost model in ms of a cluster profile (`dimee profile`) applied to each method's paths on the test
split (`dimee evaluate --cost-profile`); the measurement is `load/bench_latency.py` on the same
deployment. `dimee` is the artifact's served default policy.

    dimee profile --out profile.json
    python -m load.bench_latency --artifact artifacts/default --requests 200 --json latency.json
    python -m analysis.latency_prediction --artifact artifacts/default --profile profile.json --latency latency.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dimee_models.evaluate import run_evaluation
from dimee_models.policy import load_policies
from dimee_models.profile import latency_cost_model, read_profile

BASELINES = ("mobile_only", "edge_only", "cloud_only")


def compare(artifact_dir: Path, profile: Path, measured: dict[str, float]) -> list[dict]:
    result, _, _ = run_evaluation(artifact_dir, latency=latency_cost_model(read_profile(profile)))
    default = load_policies(artifact_dir)[1].default
    rows = []
    for mode, method in [(b, b) for b in BASELINES] + [("dimee", default)]:
        predicted = result["methods"][method]["latency_ms"]["mean"]
        rows.append({"mode": mode, "method": method, "predicted_ms": predicted, "measured_ms": measured[mode],
                     "error": predicted / measured[mode] - 1})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--profile", type=Path, required=True, help="the cost profile of the deployment")
    p.add_argument("--latency", type=Path, required=True, help="load/bench_latency.py's --json file")
    p.add_argument("--run", type=int, default=-1, help="which of its runs (default: the last)")
    p.add_argument("--json", type=Path, default=None, help="write the table here")
    args = p.parse_args(argv)
    run = json.loads(args.latency.read_text())["runs"][args.run]
    measured = run.get("mode_mean_ms") or run["policy_mean_ms"]  # runs stored before the rename say policy
    rows = compare(args.artifact, args.profile, measured)
    print(f"{'mode':<12}{'method':<30}{'predicted ms':>13}{'measured ms':>12}{'error':>8}")
    for r in rows:
        print(f"{r['mode']:<12}{r['method']:<30}{r['predicted_ms']:>13.1f}{r['measured_ms']:>12.1f}{r['error']:>8.1%}")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "profile": str(args.profile),
                                         "latency_run": run["time"], "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
