#!/usr/bin/env bash
# `ray up cluster-local.yaml` for real on this one machine: a private sshd answers on the loopback
# aliases 127.0.0.2-5, so the local provider brings up a head (no tier) and three workers
# (mobile, edge, cloud) over SSH; the head deploys ARTIFACT; we check the nodes' tier labels and an HTTP
# answer through the mobile node's front door, that the GCS keeps its state in Redis, and that Ray's job API refuses a request without the cluster's token; `ray down` must
# leave no Ray process behind. Needs root (apt, sshd). Used by CI via
# tests/test_ray_up.py.
#
#   scripts/ray_up_local.sh ARTIFACT
set -euo pipefail
ARTIFACT=$(realpath "${1:?usage: scripts/ray_up_local.sh ARTIFACT}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV_BIN=$(dirname "$(command -v ray)")
KEY=~/.ssh/dimee_ray_up
WORK=$(mktemp -d)
MARK="# dimee-ray-up"

command -v sshd >/dev/null && command -v rsync >/dev/null && command -v redis-server >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync redis-server >/dev/null; }

cleanup() {
  RAY_UP_enable_autoscaler_v2=0 timeout 120 ray down -y "$REPO/cluster-local.yaml" >/dev/null 2>&1 || true
  python -m deployments.front --stop --dir /tmp/dimee-front-127.0.0.3 2>/dev/null || true
  redis-cli -h 127.0.0.2 -p 6380 shutdown nosave >/dev/null 2>&1 || true
  [ -f "$WORK/sshd.pid" ] && kill "$(cat "$WORK/sshd.pid")" 2>/dev/null || true
  sed -i "/$MARK/d" ~/.bashrc ~/.ssh/authorized_keys 2>/dev/null || true
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

ssh-keygen -A >/dev/null
mkdir -p /run/sshd
cat > "$WORK/sshd_config" <<EOF
Port 22
ListenAddress 127.0.0.2
ListenAddress 127.0.0.3
ListenAddress 127.0.0.4
ListenAddress 127.0.0.5
PermitRootLogin prohibit-password
PasswordAuthentication no
PidFile $WORK/sshd.pid
EOF
/usr/sbin/sshd -f "$WORK/sshd_config"

echo "== ray up"
RAY_UP_enable_autoscaler_v2=0 timeout 600 ray up -y "$REPO/cluster-local.yaml" > "$WORK/up.log" 2>&1 \
  || { tail -40 "$WORK/up.log"; exit 1; }

echo "== waiting for the tiers and the app"
python - <<'EOF'
import time, requests, ray
ray.init(address="127.0.0.2:6379", logging_level="ERROR")
deadline = time.time() + 420
tiers = {"127.0.0.2": None, "127.0.0.3": "mobile", "127.0.0.4": "edge", "127.0.0.5": "cloud"}
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
        reply = requests.post("http://127.0.0.3:8000/v1/classify", json=body, timeout=30)  # the mobile node's front door
        if reply.status_code == 200:
            print("answer:", reply.json())
            break
    except requests.RequestException:  # not listening yet, or the replicas are still starting
        pass
    time.sleep(3)
else:
    raise SystemExit("the app deployed by the head start command never answered on :8000")
status = requests.get("http://127.0.0.2:8265/api/jobs/", timeout=30).status_code
if status != 401:
    raise SystemExit(f"Ray's job API answered {status} to a request without the token")
print("job API without the token: 401")
EOF

[ "$(redis-cli -h 127.0.0.2 -p 6380 dbsize)" -gt 0 ] || { echo "the GCS wrote nothing to Redis"; exit 1; }
echo "GCS state in Redis: yes"

echo "== ray down"
RAY_UP_enable_autoscaler_v2=0 timeout 180 ray down -y "$REPO/cluster-local.yaml" > "$WORK/down.log" 2>&1
python -m deployments.front --stop --dir /tmp/dimee-front-127.0.0.3
redis-cli -h 127.0.0.2 -p 6380 shutdown nosave > /dev/null 2>&1 || true
sleep 3
if pgrep -f "raylet|gcs_server" >/dev/null; then
  echo "ray down left Ray processes running:"; pgrep -af "raylet|gcs_server"; exit 1
fi
echo "ray up / serve / ray down: OK"
