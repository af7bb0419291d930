"""A real S3-compatible server for the object-store tests: moto's server mode on loopback.

``S3Server`` starts ``python -m moto.server`` on a free port of 127.0.0.1 and, once the
fixtures have made their buckets, users and objects, turns on moto's request
authentication (``/moto-api/reset-auth``): from then on every request must be signed by
an access key the server issued, and IAM policies decide what each key may do, as on
AWS. Wrong keys, unsigned requests and denied objects are refused by the server itself.

Clients find the server as users' own tools do: the standard ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION`` variables
(``S3Server.env``), with no batchscore setting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from batchscore.testing import free_port, tail, wait_for_http

REGION = "us-east-1"
ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}],
}


@dataclass(frozen=True)
class AccessKey:
    user: str
    key_id: str
    secret: str


class S3Server:
    """moto in server mode, as its own process; ``stop`` ends it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"moto-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.authenticating = False

    def start(self, seconds: float = 60) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for_http(
            f"{self.endpoint}/moto-api/data.json",
            seconds=seconds,
            process=self.process,
            log=self.log,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self) -> str:
        return tail(self.log)

    def client(self, service: str = "s3", key: AccessKey | None = None) -> Any:
        """A boto3 client of this server; before ``authenticate`` any key will do."""
        import boto3

        return boto3.client(
            service,
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=key.key_id if key else "setup",
            aws_secret_access_key=key.secret if key else "setup",
        )

    def user(self, name: str, policy: dict[str, Any] = ADMIN_POLICY) -> AccessKey:
        """An IAM user with ``policy`` and an access key of its own (before ``authenticate``)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(
            UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy)
        )
        made = iam.create_access_key(UserName=name)["AccessKey"]
        return AccessKey(name, made["AccessKeyId"], made["SecretAccessKey"])

    def authenticate(self) -> None:
        """From now on every request must be signed by an issued key, and IAM decides."""
        httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0", timeout=10)
        self.authenticating = True

    def env(self, key: AccessKey | None, home: Path) -> dict[str, str]:
        """The AWS variables of a process that reaches this server with ``key`` (None: no
        credentials at all). The shared config and credentials files point at files of
        ``home``, so nothing of the machine's own ~/.aws takes part."""
        home.mkdir(parents=True, exist_ok=True)
        values = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        if key is not None:
            values |= {"AWS_ACCESS_KEY_ID": key.key_id, "AWS_SECRET_ACCESS_KEY": key.secret}
        return values

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> list[str]:
        """Every file under ``folder`` to ``s3://bucket/prefix/...``, relative paths kept."""
        s3 = self.client()
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
            s3.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys


AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
)


class CountingProxy:
    """A TCP relay on loopback in front of the server that counts the bytes it relays to
    clients: what a client fetched, measured on the wire."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.received = 0  # bytes from the server to clients
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink, counted in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, counted), daemon=True
                ).start()

    def _pipe(self, source: Any, sink: Any, counted: bool) -> None:
        try:
            while chunk := source.recv(1 << 16):
                if counted:
                    with self._lock:
                        self.received += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
