#!/usr/bin/env bash
# `ray up cluster-local.yaml` for real on hosts that share nothing but a network: the namespaced
# hosts of `dimee cluster up --hosts netns` (10.77.0.2 head, .3 mobile, .4 edge, .5 cloud; each tier
# host with its own /tmp and no view of the artifact), each with an sshd of its own, so the local
# provider brings up the head and three workers over SSH. The head deploys ARTIFACT from its own
# disk; we check the nodes' tier labels, an HTTP answer through the mobile host's front door, the
# tier files each host received (and no other), that the GCS keeps its state in Redis, and that
# Ray's job API refuses a request without the cluster's token; `ray down` must leave no Ray
# process behind. Needs root (apt, namespaces, sshd). Used by CI via tests/test_ray_up.py.
#
#   scripts/ray_up_local.sh ARTIFACT
set -euo pipefail
ARTIFACT=$(realpath "${1:?usage: scripts/ray_up_local.sh ARTIFACT}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV_BIN=$(dirname "$(command -v ray)")
KEY=~/.ssh/dimee_ray_up
WORK=$(mktemp -d /run/dimee-ray-up.XXXX)  # not under /tmp: the tier hosts' sshd read their config here
MARK="# dimee-ray-up"
HOSTS="head:10.77.0.2 mobile:10.77.0.3 edge:10.77.0.4 cloud:10.77.0.5"

command -v sshd >/dev/null && command -v rsync >/dev/null && command -v redis-server >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync redis-server >/dev/null; }

cleanup() {
  RAY_UP_enable_autoscaler_v2=0 timeout 120 ray down -y "$REPO/cluster-local.yaml" >/dev/null 2>&1 || true
  python -c "from deployments import hosts; hosts.down()" || true  # every process in the hosts, sshd and Redis too
  sed -i "/$MARK/d" ~/.bashrc ~/.ssh/authorized_keys ~/.ssh/known_hosts 2>/dev/null || true
  [ -L ~/dimee-serve ] && rm ~/dimee-serve
  [ -n "${MADE_TOKEN:-}" ] && rm -f ~/.ray/auth_token
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p ~/.ssh && chmod 700 ~/.ssh
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -f "$KEY"
echo "$(cat "$KEY.pub") $MARK" >> ~/.ssh/authorized_keys
# Ray runs each remote command in a login shell that sources ~/.bashrc: put ray/dimee on its PATH.
echo "export PATH=$VENV_BIN:\$PATH DIMEE_ARTIFACT=$ARTIFACT $MARK" >> ~/.bashrc
[ -e ~/dimee-serve ] || ln -s "$REPO" ~/dimee-serve
# the cluster's token (cluster-local.yaml mounts it on every node), as a user makes it before `ray up`
[ -f ~/.ray/auth_token ] || { ray get-auth-token --generate >/dev/null 2>&1; MADE_TOKEN=1; }
export RAY_AUTH_MODE=token

echo "== hosts"
python - <<'EOF'
from deployments import hosts, local_cluster
nodes = local_cluster.netns_nodes()
hosts.up({"head": local_cluster.NETNS_HEAD, **{n.host: n.ip for n in nodes}}, {n.host for n in nodes})
EOF
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
for entry in $HOSTS; do
  name=${entry%%:*} ip=${entry##*:}
  printf 'Port 22\nListenAddress %s\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nPidFile %s\n' \
    "$ip" "$WORK/sshd-$name.pid" > "$WORK/sshd-$name.conf"
  python -c "import subprocess, sys; from deployments import hosts
subprocess.run([*hosts.enter(sys.argv[1]), '/usr/sbin/sshd', '-f', sys.argv[2]], check=True)" "$name" "$WORK/sshd-$name.conf"
done

echo "== ray up"
RAY_UP_enable_autoscaler_v2=0 timeout 600 ray up -y "$REPO/cluster-local.yaml" > "$WORK/up.log" 2>&1 \
  || { grep -vE '^\s*/|\) \[0x' "$WORK/up.log" | tail -60; exit 1; }  # without native stack frames

echo "== waiting for the tiers and the app"
python - <<'EOF'
import json, subprocess, sys, time
import requests, ray
from deployments import hosts
hosts.join("head")  # a driver runs on the head's network
ray.init(address="10.77.0.2:6379", logging_level="ERROR")
deadline = time.time() + 420
tiers = {"10.77.0.2": None, "10.77.0.3": "mobile", "10.77.0.4": "edge", "10.77.0.5": "cloud"}
while time.time() < deadline:
    nodes = {n["NodeManagerAddress"]: n["Labels"].get("dimee.io/tier") for n in ray.nodes() if n["Alive"]}
    if nodes == tiers:
        break
    time.sleep(3)
else:
    raise SystemExit(f"tier labels not on the expected nodes: {nodes}")
print("tier labels:", dict(sorted(nodes.items())))
body = {"texts": ["a gorgeous, witty, seductive movie.", "the plot is a mess."]}
while time.time() < deadline:
    try:
        reply = requests.post("http://10.77.0.3:8000/v1/classify", json=body, timeout=30)  # the mobile host's front door
        if reply.status_code == 200:
            print("answer:", reply.json())
            break
    except requests.RequestException:  # not listening yet, or the replicas are still starting
        pass
    time.sleep(3)
else:
    raise SystemExit("the app deployed by the head start command never answered on :8000")
received = {}
for name in ("mobile", "edge", "cloud"):  # what each host's cache holds: its own tier's files only
    listing = subprocess.run([*hosts.enter(name), "sh", "-c", "find /tmp/dimee-cache-$(id -u)/views -mindepth 2 "
                              "\\( -type f -o -type l \\) -printf '%P\\n'"], capture_output=True, text=True, check=True).stdout.split()
    received[name] = sorted({f.split("/", 1)[1] for f in listing})
print("tier files:", json.dumps(received))
if any(f"{other}.safetensors" in received[name] for name in received for other in received if other != name):
    raise SystemExit("a host holds another tier's weights")
status = requests.get("http://10.77.0.2:8265/api/jobs/", timeout=30).status_code
if status != 401:
    raise SystemExit(f"Ray's job API answered {status} to a request without the token")
print("job API without the token: 401")
EOF

[ "$(nsenter --net=/run/netns/dimee-head redis-cli -p 6380 dbsize)" -gt 0 ] || { echo "the GCS wrote nothing to Redis"; exit 1; }
echo "GCS state in Redis: yes"

echo "== ray down"
RAY_UP_enable_autoscaler_v2=0 timeout 180 ray down -y "$REPO/cluster-local.yaml" > "$WORK/down.log" 2>&1
sleep 3
left=$(for entry in $HOSTS; do ip netns pids "dimee-${entry%%:*}"; done | xargs -r ps -o comm= -p | grep -cE "raylet|gcs_server" || true)
[ "$left" = 0 ] || { echo "ray down left $left Ray processes running"; exit 1; }
echo "ray up / serve / ray down: OK"
