"""What the load tools say to the service, written once: its URL and paths, the modes a request
can ask for, a classify request posted, timed and judged (`post`, `judge`), the Locust command
line and its options, and the stats entry that counts 503 refusals apart."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import get_args

import requests

from dimee_models.policy import Mode
from dimee_models.tiers import TIER_NAMES

DEFAULT_URL = "http://127.0.0.1:8000"
CLASSIFY, INFO, HEALTHZ = "/v1/classify", "/v1/info", "/healthz"
MODES: tuple[str, ...] = get_args(Mode)
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SHED = " [503 at capacity]"  # the locustfile's suffix for the stats of 503-with-Retry-After refusals
ANSWERED = ("ok", "fallback", "degraded")


@dataclass(frozen=True)
class Reply:
    """One classify request as its client saw it, judged once. `outcome`: ok (200, every prediction
    normal), fallback or degraded (200, some prediction marked so; degraded, the shallower answer,
    wins), shed (503 with Retry-After: refused for capacity, neither an answer nor a failure) or
    failed (any other status, a 200 without one prediction per text, no answer at all)."""

    outcome: str
    status: int | None = None  # None: no answer (refused connection, timeout)
    latency_ms: float = 0.0
    predictions: list[dict] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None  # why it failed
    retry_after_s: float = 0.0  # how long a shed client should wait

    @property
    def answered(self) -> bool:
        return self.outcome in ANSWERED

    def raise_unless_answered(self) -> Reply:
        """For tools that measure answers, which anything else (a refusal too) must stop."""
        if not self.answered:
            raise RuntimeError(f"{CLASSIFY}: {self.outcome} (HTTP {self.status}): {self.error or 'no answer'}")
        return self


def request_body(texts: list[str], mode: str = "dimee", text_pairs: list[str] | None = None) -> dict:
    return {"texts": texts, "mode": mode, **({} if text_pairs is None else {"text_pairs": text_pairs})}


def judge(response, sent: int, latency_ms: float = 0.0) -> Reply:
    """A classify answer to `sent` texts, judged; `response` is requests' or Locust's (both have
    status_code, headers, text and json(); Locust's status is 0 and its headers None when no
    answer came)."""
    status = response.status_code
    reply = partial(Reply, status=status, latency_ms=latency_ms, headers=response.headers or {})
    if status == 503 and response.headers.get("Retry-After"):
        return reply("shed", retry_after_s=float(response.headers["Retry-After"]))
    if status != 200:
        return reply("failed", error=f"HTTP {status}: {(response.text or '')[:200]}")
    try:
        body = response.json()
    except ValueError:
        return reply("failed", error=f"answer is not JSON: {response.text[:200]}")
    predictions = body.get("predictions") if isinstance(body, dict) else None
    if not isinstance(predictions, list) or len(predictions) != sent:
        got = len(predictions) if isinstance(predictions, list) else "no"
        return reply("failed", error=f"sent {sent} texts, got {got} predictions")
    for p in predictions:
        if not isinstance(p, dict) or p.get("tier") not in TIER_NAMES or not isinstance(p.get("exit_layer"), int):
            return reply("failed", error=f"prediction without a valid tier and exit layer: {p}")
    return reply(next((flag for flag in ("degraded", "fallback") if any(p.get(flag) for p in predictions)), "ok"),
                 predictions=predictions)


def post(session: requests.Session, url: str, body: dict, timeout: float = 60.0) -> Reply:
    """`body` (see `request_body`) posted to the service at `url`, timed and judged."""
    began = time.perf_counter()
    try:
        response = session.post(f"{url}{CLASSIFY}", json=body, timeout=timeout)
    except requests.RequestException as err:
        return Reply("failed", latency_ms=(time.perf_counter() - began) * 1000, error=repr(err)[:200])
    return judge(response, len(body["texts"]), (time.perf_counter() - began) * 1000)


def is_shed(stats_name: str) -> bool:
    """Whether a Locust stats entry counts refusals (503 with Retry-After), neither answers nor failures."""
    return stats_name.endswith(SHED)


@dataclass(frozen=True)
class LocustOptions:
    """What a tool's Locust runs share; users, mode and length are per run (`load.run.run_locust`)."""

    host: str = DEFAULT_URL
    texts_per_request: int = 1
    dataset: str = "rt-polarity"
    think_time: float = 0.0
    client_timeout: float = 60.0  # seconds before a request counts as failed (the locustfile's --client-timeout)
    cpu_breakdown: bool = False  # the cluster runs on this machine: also CPU ms per request by process


def locust_command(options: LocustOptions, mode: str, more: list[str],
                   files: tuple[Path, ...] = (LOCUSTFILE,)) -> list[str]:
    """Headless Locust running the locustfile (and any shape in `files`); `more`: this run's own flags."""
    return [sys.executable, "-m", "locust", "-f", ",".join(str(f) for f in files), "--headless", "--only-summary",
            "--host", options.host, "--loglevel", "WARNING", "--mode", mode,
            "--texts-per-request", str(options.texts_per_request), "--think-time", str(options.think_time),
            "--dataset", options.dataset, "--client-timeout", str(options.client_timeout), *more]


def emit(result: dict, out: Path | None) -> None:
    """A tool's result: printed, and written to `out` as JSON if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
