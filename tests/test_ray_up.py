"""`ray up cluster-local.yaml` for real: SSH to namespaced hosts that share nothing but a network,
tier labels by host, the app deployed by the head's start command answers HTTP, each tier host
received its tier's files only, Ray's token authentication is on, and `ray down` leaves nothing
running."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: installs openssh-server, makes namespaced hosts and runs their sshd")
def test_ray_up_local_provider_brings_up_serves_and_tears_down(served_artifact):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "ray_up_local.sh"), str(served_artifact)],
                            env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("tier labels: {'10.77.0.2': None, '10.77.0.3': 'mobile', '10.77.0.4': 'edge', '10.77.0.5': 'cloud'}"
            in result.stdout)  # a head with no tier
    received = json.loads(result.stdout.split("tier files: ", 1)[1].splitlines()[0])
    assert received["edge"] == ["config.json", "edge.safetensors", "manifest.json"]
    assert received["cloud"] == ["cloud.safetensors", "config.json", "manifest.json"]
    assert "mobile.safetensors" in received["mobile"] and "policy.json" in received["mobile"]
    assert not {"edge.safetensors", "cloud.safetensors"} & set(received["mobile"])
    assert "job API without the token: 401" in result.stdout  # Ray's token authentication is on
    assert "GCS state in Redis: yes" in result.stdout  # head fault tolerance
    assert "ray up / serve / ray down: OK" in result.stdout
