"""A real S3 API server for tests: moto's standalone server, run as a subprocess on 127.0.0.1.

Its objects live in the server's memory, so a killed server loses them (as a crashed
single-node server without a disk would). `Outage` is a TCP relay in front of it whose
connections can be cut and restored, for faults where the server keeps its data.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kdcache-test-key", "AWS_SECRET_ACCESS_KEY": "kdcache-test-secret",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


class S3Server:
    """moto_server on a free port of 127.0.0.1; `env` points S3 clients at it."""

    def __init__(self, port: int = 0, *, auth: bool = False) -> None:
        self.port, self.auth = port, auth
        self.proc: subprocess.Popen[str] | None = None
        self.requests = 0  # requests logged since the last `count_requests()` reset
        self._lines: list[str] = []

    def start(self) -> S3Server:
        env = dict(os.environ)
        if self.auth:  # check signatures from the first request on
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError("moto_server exited before it listened")
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if '" 2' in line or '" 3' in line or '" 4' in line or '" 5' in line:
                self.requests += 1
                self._lines.append(line)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        """Kill the server and start a new one on the same port (its objects are gone)."""
        self.stop()
        self.start()

    def request_lines(self) -> list[str]:
        """The access-log lines since the last call (method and path of each request)."""
        time.sleep(0.2)  # the log trails the responses
        out, self._lines = self._lines, []
        return out

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=name)


class Outage:
    """A TCP relay to `port`: clients talk to `self.port`; `cut()` refuses and drops every
    connection, `restore()` serves again. The server behind keeps its data."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up.clear()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._open.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block (S3 clients read them when built)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
