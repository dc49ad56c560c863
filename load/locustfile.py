"""Locust load test of the DIMEE-Serve HTTP API with real texts from a dataset's test split.

    locust -f load/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 60s \
        --mode dimee --texts-per-request 1 --dataset rt-polarity
    python load/locustfile.py --host http://127.0.0.1:8000      # one user, prints every request

`python -m load.run` runs this headless for `dimee` and `cloud_only` and writes the comparison report.
The test split is the one `dimee train` holds out with its default split fractions and seed, so
the load has the same mix of easy and hard samples as the offline evaluation.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from locust import FastHttpUser, between, constant, events, run_single_user, task

from dimee_models.data import DEFAULT_SEED, DEFAULT_SPLITS, load_dataset, split
from load.client import CLASSIFY, MODES, SHED, judge, request_body

TEXTS: list[str] = []
PAIRS: list[str] | None = None
SEEN = {"tiers": Counter(), "layers": 0, "predictions": 0, "fallback": 0, "degraded": 0}  # answers checked here
THINK = constant(0)  # the wait between requests, from --think-time


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--mode", default="dimee", choices=MODES, help="the mode every request asks for")
    parser.add_argument("--texts-per-request", type=int, default=1, help="texts in each request")
    parser.add_argument("--think-time", type=float, default=0.0,
                        help="seconds a user waits between requests (uniform in [0, 2x]; 0: none)")
    parser.add_argument("--dataset", default="rt-polarity",
                        help="dataset whose test split supplies the texts: a name or csv:/jsonl:PATH")
    parser.add_argument("--tier-stats", default="", help="write the answering-tier counts to this JSON file at the end")
    parser.add_argument("--client-timeout", type=float, default=60.0,
                        help="seconds a request may wait for its answer before it counts as failed (default 60); "
                             "under Locust's --stop-timeout, so that a request that hangs is counted, not dropped")
    parser.add_argument("--ignore-retry-after", action="store_true",
                        help="send the next request at once after a 503, instead of waiting its Retry-After")


@events.init.add_listener
def _load_texts(environment, **_) -> None:
    global TEXTS, PAIRS, THINK
    options = environment.parsed_options
    if options.texts_per_request < 1:
        raise SystemExit(f"--texts-per-request must be at least 1, got {options.texts_per_request}")
    test = split(load_dataset(options.dataset), DEFAULT_SPLITS, DEFAULT_SEED).test
    TEXTS, PAIRS = test.texts, test.text_pairs
    THINK = between(0, 2 * options.think_time) if options.think_time > 0 else constant(0)
    ClassifyUser.network_timeout = ClassifyUser.connection_timeout = options.client_timeout


@events.test_stop.add_listener
def _write_tier_stats(environment, **_) -> None:
    if environment.parsed_options.tier_stats:
        with open(environment.parsed_options.tier_stats, "w") as f:
            json.dump({**SEEN, "tiers": dict(SEEN["tiers"])}, f)


class ClassifyUser(FastHttpUser):
    retry_after = 0.0  # set by a 503: a well-behaved client waits this long before its next request

    def wait_time(self) -> float:
        pause, self.retry_after = self.retry_after, 0.0
        return pause or THINK(self)

    @task
    def classify(self) -> None:
        options = self.environment.parsed_options
        rows = random.sample(range(len(TEXTS)), min(options.texts_per_request, len(TEXTS)))
        pairs = None if PAIRS is None else [PAIRS[i] for i in rows]
        body = request_body([TEXTS[i] for i in rows], options.mode, pairs)
        with self.client.post(CLASSIFY, json=body, name=f"{CLASSIFY} [{options.mode}]",
                              catch_response=True) as response:
            reply = judge(response, len(rows))
            if reply.outcome == "shed":  # at capacity, and said when to come back: not a failure, not an answer
                response.request_meta["name"] += SHED
                response.success()
                if not options.ignore_retry_after:
                    self.retry_after = reply.retry_after_s
                return
            if not reply.answered:
                response.failure(reply.error)
                return
            for p in reply.predictions:
                SEEN["tiers"][p["tier"]] += 1
                SEEN["layers"] += p["exit_layer"]
                SEEN["predictions"] += 1
                SEEN["fallback"] += bool(p.get("fallback"))
                SEEN["degraded"] += bool(p.get("degraded"))


if __name__ == "__main__":
    run_single_user(ClassifyUser)
