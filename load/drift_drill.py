"""The drift drill: labelled traffic from the served model's own distribution (its test split),
then switched to a shift that breaks the served policy's gates; after every request the live bound
is read from /v1/info. Since the texts are labelled and the final exit's answers are computed
offline (served == offline is tested), the true disagreement and accuracy drop of every request
are known, to set beside what the live bound said.

Reproduce (every sample shadow-checked, so that the drill is short; docs/RESULTS.md, "The live bound and a drift drill"):
    dimee up --shadow-rate 1
    python -m load.drift_drill --artifact artifacts/default --before 50 --after 300 --out runs/drift
    # no false alarm: a long run in distribution, on a fresh deployment
    dimee up --shadow-rate 1
    python -m load.drift_drill --artifact artifacts/default --before 650 --after 0 --texts-per-request 32 --out runs/steady
    dimee down
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import requests

from dimee_models import artifact
from dimee_models.evaluate import predict_texts
from load.client import DEFAULT_URL, INFO, post, request_body


def rebuttal(text: str, label: int, others: dict[int, list[str]], rng: random.Random) -> str:
    """The text after a quoted opinion of another label that it rebuts: its label stays the text's
    own (the writer's). The opinion the early exits read first pulls them the other way, and
    rt-polarity has few such texts: on the default model's first 600 test texts, offline, the
    served gates kept 70% of these early and 1.5% of all answers differed from the final exit's,
    each a loss (5x the 0.3 pp budget). Shuffled or misspelt words, a negating prefix and a cut
    to four words did not break the gates there (0.00-0.17 pp)."""
    return f"critics said: {rng.choice(others[label])} i disagree. {text}"


SHIFTS = {"rebuttal": rebuttal}


def drill_texts(directory: Path, shift: str, before: int, after: int, per_request: int,
                seed: int) -> list[tuple[str, list[str], list[int]]]:
    """(phase, texts, labels) per request: test-split texts drawn with replacement, the shifted ones transformed."""
    test = artifact.load_split(directory, "test")
    others = {y: [t for t, other in zip(test.texts, test.labels) if other != y] for y in set(test.labels)}
    rng = random.Random(seed)
    requests_ = []
    for phase, count in (("before", before), ("shifted", after)):
        for _ in range(count):
            rows = [rng.randrange(len(test.texts)) for _ in range(per_request)]
            texts = [test.texts[r] for r in rows]
            labels = [test.labels[r] for r in rows]
            if phase == "shifted":
                texts = [SHIFTS[shift](t, y, others, rng) for t, y in zip(texts, labels)]
            requests_.append((phase, texts, labels))
    return requests_


def final_answers(directory: Path, batches: list[list[str]]) -> list[list[int]]:
    """The final exit's answer to every text, offline (what cloud_only serves)."""
    flat = sorted({t for texts in batches for t in texts})
    final = {}
    for i in range(0, len(flat), 256):
        chunk = flat[i:i + 256]
        final.update(zip(chunk, (p["label_id"] for p in predict_texts(directory, chunk, "cloud_only"))))
    return [[final[t] for t in texts] for texts in batches]


def run(args) -> dict:
    plan = drill_texts(args.artifact, args.shift, args.before, args.after, args.texts_per_request, args.seed)
    finals = final_answers(args.artifact, [texts for _, texts, _ in plan])
    session = requests.Session()
    info = session.get(f"{args.url}{INFO}", timeout=30).json()
    timeline = []
    for i, ((phase, texts, labels), final) in enumerate(zip(plan, finals)):
        served = post(session, args.url, request_body(texts)).raise_unless_answered().predictions
        live = session.get(f"{args.url}{INFO}", timeout=30).json()["live_risk"]
        answer = [p["label_id"] for p in served]
        timeline.append({
            "request": i, "phase": phase, "texts": len(texts),
            "early": sum(p["tier"] != "cloud" for p in served),
            "disagree": sum(a != f for a, f in zip(answer, final)),
            "served_right": sum(a == y for a, y in zip(answer, labels)),
            "final_right": sum(f == y for f, y in zip(final, labels)),
            **{k: live.get(k) for k in ("state", "threshold", "samples", "disagreements", "ucb_pp", "lcb_pp")},
        })
    return {"shift": args.shift, "shadow_rate": info["shadow_rate"], "policy": info["policy"],
            "budget_pp": info["live_risk"]["budget_pp"], "texts_per_request": args.texts_per_request,
            "summary": summarize(timeline), "timeline": timeline}


def totals(rows: list[dict]) -> dict:
    """True disagreement with the final exit and accuracy drop against it, pp, over these requests."""
    n = sum(r["texts"] for r in rows)
    if not n:
        return {"requests": 0}
    return {"requests": len(rows), "texts": n, "early_share": sum(r["early"] for r in rows) / n,
            "disagreement_pp": 100 * sum(r["disagree"] for r in rows) / n,
            "drop_pp": 100 * (sum(r["final_right"] for r in rows) - sum(r["served_right"] for r in rows)) / n,
            "served_accuracy": sum(r["served_right"] for r in rows) / n}


def summarize(timeline: list[dict]) -> dict:
    """Per phase the truth (totals) beside what the live bound said at the phase's end; after the
    state left ok, the truth per threshold served."""
    live = ("state", "threshold", "samples", "disagreements", "ucb_pp", "lcb_pp")
    before = [r for r in timeline if r["phase"] == "before"]
    shifted = [r for r in timeline if r["phase"] == "shifted"]
    left = next((r for r in shifted if r["state"] != "ok"), None)
    while_ok = [r for r in shifted if left is None or r["request"] < left["request"]]
    after = [r for r in shifted if left is not None and r["request"] >= left["request"]]
    return {
        "before": {**totals(before), "live_at_end": {k: before[-1][k] for k in live} if before else None},
        "shifted_while_ok": {**totals(while_ok), "live_at_end": {k: while_ok[-1][k] for k in live} if while_ok else None},
        "requests_after_shift_until_not_ok": None if left is None else len(while_ok) + 1,
        "after_leaving_ok_by_threshold": {str(t): totals([r for r in after if r["threshold"] == t])
                                          for t in dict.fromkeys(r["threshold"] for r in after)},
        "last": {k: timeline[-1][k] for k in live} if timeline else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help="the service's base URL")
    p.add_argument("--artifact", type=Path, required=True, help="the served artifact (its test split and final exit)")
    p.add_argument("--shift", choices=sorted(SHIFTS), default=next(iter(SHIFTS)), help="the shift after --before")
    p.add_argument("--before", type=int, default=50, help="requests from the test split first")
    p.add_argument("--after", type=int, default=300, help="requests of shifted texts then")
    p.add_argument("--texts-per-request", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="report directory (created)")
    args = p.parse_args(argv)
    if not (args.artifact / "manifest.json").is_file():
        p.error(f"--artifact: {args.artifact} is not an artifact directory")
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drill.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
