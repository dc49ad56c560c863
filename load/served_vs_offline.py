"""Whether the service answers each of the artifact's test texts as the full model does offline
with the same policy (`dimee_models.evaluate.predict_texts`): tier, label, exit layer and
confidence (to 1e-4), sample by sample.

    python -m load.served_vs_offline artifacts/default --url http://10.77.0.3:8000 --texts 300 --out runs/same.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import requests

from dimee_models import artifact
from dimee_models.evaluate import predict_texts
from load.client import DEFAULT_URL, emit, post, request_body

KEYS = ("tier", "label_id", "exit_layer")


def compare(url: str, directory: Path, count: int, batch: int = 16) -> dict:
    texts = artifact.load_split(directory, "test").texts[:count]
    session, served = requests.Session(), []
    for i in range(0, len(texts), batch):
        served += post(session, url, request_body(texts[i:i + batch])).raise_unless_answered().predictions
    policy = requests.get(url + "/v1/info", timeout=30).json()["policy"]["name"]
    offline = predict_texts(directory, texts, policy_name=policy)
    differ = [i for i, (s, o) in enumerate(zip(served, offline))
              if any(s[k] != o[k] for k in KEYS) or abs(s["confidence"] - o["confidence"]) > 1e-4]
    return {"url": url, "artifact": str(directory), "texts": len(texts), "same": len(texts) - len(differ),
            "differ": [{"text": texts[i], "served": served[i], "offline": offline[i]} for i in differ],
            "tiers": {t: sum(s["tier"] == t for s in served) for t in ("mobile", "edge", "cloud")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="the served artifact's directory")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--texts", type=int, default=300, help="the first N texts of its test split (default 300)")
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    result = compare(args.url.rstrip("/"), args.artifact, args.texts)
    emit(result, args.out)
    return 0 if not result["differ"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
