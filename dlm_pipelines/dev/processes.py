"""Child processes of the dev stack, each started, watched and stopped by its PID.

Every child runs in its own session (so the terminal's Ctrl-C reaches only the
stack, which then stops them in order) and carries a marker in its environment.
The marker finds what a child left behind, such as a Dagster run worker: at stop
time every live process with the marker is killed by PID. On Linux a child also
dies with the stack, should the stack itself be killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

MARKER = "DLM_DEV_STACK_MARKER"  # not a setting: tags the processes of one stack
_PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child, where loading a library could deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL me when the thread that started me ends."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ManagedProcess:
    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.stop_signal = stop_signal
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 15) -> None:
        """`stop_signal` to the process group, then SIGKILL if it is still there."""
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, self.stop_signal)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Whatever is left in its group (a worker that outlived its parent) goes too.
        _signal_group(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would (tests use this)."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def marked_pids(marker_value: str) -> list[int]:
    """Live processes (not this one) whose environment carries `MARKER=marker_value`."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    needle = f"{MARKER}={marker_value}".encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_marked(marker_value: str, timeout: float = 10) -> list[int]:
    """SIGKILL every process with the marker; returns their PIDs."""
    pids = marked_pids(marker_value)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and marked_pids(marker_value):
        time.sleep(0.1)
    return pids
