"""The local cluster's own daemons (the front door, Redis, Prometheus), found and stopped by their
pid files."""

from __future__ import annotations

from pathlib import Path

import psutil


def process_of(pid_file: Path, name: str) -> psutil.Process | None:
    """The running process `pid_file` names, if its name holds `name` (a stale file may name another)."""
    try:
        proc = psutil.Process(int(pid_file.read_text().split()[0]))
        return proc if name in proc.name() else None
    except (OSError, ValueError, psutil.NoSuchProcess):
        return None


def stop_pid_file(pid_file: Path, name: str) -> None:
    """Stop the process `pid_file` names (`process_of`), if it runs, and remove the file."""
    proc = process_of(pid_file, name)
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            proc.kill()
    pid_file.unlink(missing_ok=True)
