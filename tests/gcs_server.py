"""A real Google Cloud Storage emulator on loopback, for the ``gs://`` tests.

``gcp-storage-emulator`` (a test extra) serves the GCS JSON API and the object
downloads in its own process. Google's Python client (the ``[gcs]`` extra, which
``shopee_tpu.fs`` uses) reaches it through ``STORAGE_EMULATOR_HOST``.

TensorFlow's own GCS file system, which ``tf.data`` reads ``gs://`` records with,
ignores ``STORAGE_EMULATOR_HOST``: its endpoints are fixed to
``https://www.googleapis.com/storage/v1/`` and ``https://storage.googleapis.com``
(xla/tsl/platform/cloud/gcs_file_system.cc). Its libcurl does honour
``HTTPS_PROXY`` and ``CURL_CA_BUNDLE`` (curl_http_request.cc), and
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` gives it a token without credentials
(google_auth_provider.cc). So a small proxy on loopback answers TensorFlow's
``CONNECT`` to those two hosts itself: it ends TLS with a certificate for them from
a throwaway CA (``trustme``) that only this test's processes trust, and relays the
plain HTTP to the emulator. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import trustme

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """The emulator process and TensorFlow's proxy to it; ``env()`` is what a
    process needs to reach both. Use as a context manager."""

    def __init__(self, tmp_path, bucket: str = "bucket"):
        self.port, self.bucket = free_port(), bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self._ca_file = os.fspath(tmp_path / "gcs-test-ca.pem")
        self._log = open(tmp_path / "gcs-emulator.log", "wb")  # noqa: SIM115
        self._server = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "-H",
             "127.0.0.1", "--port", str(self.port), "--in-memory",
             "--default-bucket", bucket],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_until_ready()
        self._proxy = _TlsProxy(self.port, self._ca_file)

    def _wait_until_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                raise RuntimeError(
                    f"the GCS emulator exited ({self._server.returncode})"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}"):
                    return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError(f"the GCS emulator did not answer within {timeout:.0f} s")

    def env(self) -> dict[str, str]:
        """Variables for a process that reads and writes ``gs://`` here: Google's
        client through ``STORAGE_EMULATOR_HOST``, TensorFlow through the proxy."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "HTTPS_PROXY": f"http://127.0.0.1:{self._proxy.port}",
            "https_proxy": f"http://127.0.0.1:{self._proxy.port}",
            "CURL_CA_BUNDLE": self._ca_file,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "NO_GCE_CHECK": "true",
        }

    def objects(self) -> list[str]:
        """Every object name in the bucket, straight from the emulator's JSON API."""
        import json

        url = f"{self.url}/storage/v1/b/{self.bucket}/o"
        with urllib.request.urlopen(url) as r:
            return sorted(item["name"] for item in json.load(r).get("items", []))

    def close(self) -> None:
        self._server.terminate()
        try:
            self._server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()
        self._log.close()
        if getattr(self, "_proxy", None):
            self._proxy.close()

    def __enter__(self) -> GcsEmulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TlsProxy:
    """An HTTPS proxy that answers ``CONNECT`` to Google's storage hosts itself and
    relays the decrypted requests to the emulator; it refuses any other host."""

    def __init__(self, upstream_port: int, ca_file: str):
        ca = trustme.CA()
        ca.cert_pem.write_to_path(ca_file)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*GOOGLE_HOSTS).configure_cert(self._context)
        self._upstream = upstream_port
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._socket.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                client.close()
                return
            head += data
        method, target, *_ = head.split(b"\r\n", 1)[0].decode().split()
        if method != "CONNECT" or target.rsplit(":", 1)[0] not in GOOGLE_HOSTS:
            client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            client.close()
            return
        # No Nagle delay on the small writes relayed both ways.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            secure = self._context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self._upstream))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_relay, args=(upstream, secure), daemon=True).start()
        _relay(secure, upstream)

    def close(self) -> None:
        self._socket.close()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
