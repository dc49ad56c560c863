"""The front door (deployments/front.py): a real HAProxy in front of a stand-in for Serve's proxy
that loses the first try of each request the way Serve does when an ingress replica dies."""

import http.server
import socket
import subprocess
import threading

import pytest
import requests

from deployments import front


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Flaky(http.server.BaseHTTPRequestHandler):
    """Every other POST fails: a 500 (Serve's proxy when the replica died) or a closed connection
    (the proxy itself gone); the body is echoed back on success, so that the resent one is checked."""

    failure = "500"
    posts = 0

    def do_GET(self):  # the front door's health check of this server
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts += 1
        if self.posts % 2:
            if self.failure in ("500", "503"):
                self.send_response(int(self.failure))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def door(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    listen = f"127.0.0.1:{free_port()}"
    front.start(tmp_path, listen, [f"127.0.0.1:{server.server_port}"])
    try:
        yield f"http://{listen}", tmp_path
    finally:
        front.stop(tmp_path)
        server.shutdown()
    assert front.running(tmp_path) is None


@pytest.mark.parametrize("failure", ["500", "closed"])
def test_a_request_whose_first_try_is_lost_is_sent_again_whole(door, failure, monkeypatch):
    url, directory = door
    monkeypatch.setattr(Flaky, "failure", failure)
    monkeypatch.setattr(Flaky, "posts", 0)
    body = {"texts": ["a fine film"] * 200}  # ~3 KB: read whole before it is sent, so it can be resent
    for _ in range(3):
        r = requests.post(f"{url}/v1/classify", json=body, timeout=30)
        assert r.status_code == 200 and r.json() == body
    assert Flaky.posts == 6 and front.retries(directory) > 0


def test_a_refusal_is_not_resent(door, monkeypatch):
    """503 is the ingress refusing work when it is full: sending it again would add load."""
    url, directory = door
    monkeypatch.setattr(Flaky, "failure", "503")
    monkeypatch.setattr(Flaky, "posts", 0)
    assert requests.post(f"{url}/v1/classify", json={"texts": ["a"]}, timeout=30).status_code == 503
    assert Flaky.posts == 1 and front.retries(directory) == 0


def test_the_config_is_valid_and_a_running_front_door_is_kept(door):
    url, directory = door
    check = subprocess.run([front.binary(), "-c", "-f", str(directory / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    pid = front.running(directory)
    listen = url.removeprefix("http://")
    servers = [line.split()[2] for line in (directory / "haproxy.cfg").read_text().splitlines()
               if line.strip().startswith("server ")]
    assert front.start(directory, listen, servers) == pid  # the same config: not restarted
