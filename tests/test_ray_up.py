"""`ray up cluster-local.yaml` for real: SSH to loopback hosts, tier labels by host, the app
deployed by the head's start command answers HTTP, Ray's token authentication is on, and `ray down`
leaves nothing running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.cluster
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: installs openssh-server and runs a private sshd")
def test_ray_up_local_provider_brings_up_serves_and_tears_down(served_artifact):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "ray_up_local.sh"), str(served_artifact)],
                            env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("tier labels: {'127.0.0.2': None, '127.0.0.3': 'mobile', '127.0.0.4': 'edge', '127.0.0.5': 'cloud'}"
            in result.stdout)  # a head with no tier
    assert "job API without the token: 401" in result.stdout  # Ray's token authentication is on
    assert "GCS state in Redis: yes" in result.stdout  # head fault tolerance
    assert "ray up / serve / ray down: OK" in result.stdout
