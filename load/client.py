"""What the load tools say to the service, written once: its URL and paths, the modes a request
can ask for, the Locust command line, and the stats entry that counts 503 refusals apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import get_args

from dimee_models.policy import Mode

DEFAULT_URL = "http://127.0.0.1:8000"
CLASSIFY, INFO, HEALTHZ = "/v1/classify", "/v1/info", "/healthz"
MODES: tuple[str, ...] = get_args(Mode)
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SHED = " [503 at capacity]"  # the locustfile's suffix for the stats of 503-with-Retry-After refusals


def is_shed(stats_name: str) -> bool:
    """Whether a Locust stats entry counts refusals (503 with Retry-After), neither answers nor failures."""
    return stats_name.endswith(SHED)


def locust_command(host: str, mode: str, texts_per_request: int, dataset: str, think_time: float,
                   more: list[str], files: tuple[Path, ...] = (LOCUSTFILE,)) -> list[str]:
    """Headless Locust running the locustfile (and any shape in `files`); `more`: this run's own flags."""
    return [sys.executable, "-m", "locust", "-f", ",".join(str(f) for f in files), "--headless", "--only-summary",
            "--host", host, "--loglevel", "WARNING", "--mode", mode, "--texts-per-request", str(texts_per_request),
            "--think-time", str(think_time), "--dataset", dataset, *more]


def emit(result: dict, out: Path | None) -> None:
    """A tool's result: printed, and written to `out` as JSON if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
