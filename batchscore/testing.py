"""Real services on free loopback ports, for the tests, the benchmarks and the demo.

Like ``distributed.utils_test``, this module is installed with the package so that
``bench/`` and ``batchscore demo`` start servers and wait for them exactly as the tests
do; no library module imports it (tests/unit/test_layers.py puts it in the top layer).

- ``free_port``: a port on 127.0.0.1 that the kernel handed out a moment ago.
- ``RedisServer``: a real ``redis-server`` that a caller may stop, kill and start again.
- ``wait_until`` / ``wait_for_http``: poll until a started service answers, failing at
  once, with its log's tail, when its process has exited instead.
- ``stop_process_groups``: stop servers that fork, children and all.

Errors::

    ServiceError              a service for a test or benchmark is not usable
    ├── ProgramMissing        its program is not installed
    ├── ServiceExited         its process ended before it answered
    └── ServiceTimeout        it did not answer within the time given
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis

LOOPBACK = "127.0.0.1"
REDIS_START_SECONDS = 10.0


class ServiceError(RuntimeError):
    """A server started for a test, a benchmark or the demo is missing, died or is mute."""


class ProgramMissing(ServiceError):
    def __init__(self, program: str, fix: str) -> None:
        self.program, self.fix = program, fix
        super().__init__(f"{program} is not installed: {fix}")


class ServiceExited(ServiceError):
    def __init__(self, what: str, returncode: int, log: str = "") -> None:
        self.what, self.returncode, self.log = what, returncode, log
        super().__init__(
            f"{what} exited with code {returncode} before it answered" + (f"\n{log}" if log else "")
        )


class ServiceTimeout(ServiceError):
    def __init__(self, what: str, seconds: float, last: str = "", log: str = "") -> None:
        self.what, self.seconds, self.last, self.log = what, seconds, last, log
        found = f" (last answer: {last})" if last else ""
        super().__init__(
            f"{what} did not answer within {seconds:.0f} s{found}" + (f"\n{log}" if log else "")
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (the kernel picks it).

    Another process may take it before the caller binds it: the kernel hands out its
    ephemeral ports in turn, so that window is short enough for tests and benchmarks.
    """
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 80) -> str:
    """The last ``lines`` lines of a log (a service's output, for an error message)."""
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _headed_tail(path: Path | None, lines: int = 40) -> str:
    return "" if path is None else f"--- {path} ---\n{tail(path, lines)}"


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    seconds: float,
    process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Call ``ready`` until it returns True; raise ``ServiceExited`` as soon as ``process``
    has ended, ``ServiceTimeout`` after ``seconds``. Both carry the tail of ``log``.

    ``ready`` is called at least once, after ``process`` is checked, so a service whose
    process died is never reported ready because something else holds its port.
    """
    deadline = time.monotonic() + seconds
    while True:
        if process is not None and process.poll() is not None:
            raise ServiceExited(what, process.returncode, _headed_tail(log))
        if ready():
            return
        if time.monotonic() > deadline:
            raise ServiceTimeout(what, seconds, log=_headed_tail(log))
        time.sleep(interval)


def wait_for_http(
    url: str,
    *,
    seconds: float = 60,
    process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
    ok: Callable[[int], bool] = lambda status: status == 200,
) -> None:
    """Poll ``url`` (GET) until its status passes ``ok``, as ``wait_until`` does."""
    last = ""

    def answered() -> bool:
        nonlocal last
        try:
            status = httpx.get(url, timeout=1).status_code
        except httpx.HTTPError as exc:
            last = repr(exc)
            return False
        last = str(status)
        return ok(status)

    try:
        wait_until(answered, what=url, seconds=seconds, process=process, log=log, interval=0.2)
    except ServiceTimeout as exc:
        raise ServiceTimeout(url, seconds, last, exc.log) from None


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group; a group that has ended already is no error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process_groups(leaders: Sequence[subprocess.Popen[Any]], grace: float = 30) -> None:
    """TERM to the group of each leader (started with ``start_new_session=True``) at once,
    then KILL to whatever is left after ``grace`` seconds.

    A server that forks (Airflow's components, their task processes, Dask workers) leaves
    children behind when only its first process is signalled; its group holds them all.
    """
    for leader in leaders:
        signal_group(leader.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for leader in leaders:
            leader.poll()  # reap the leaders so that only live members count
        if not any(group_alive(leader.pid) for leader in leaders):
            break
        time.sleep(0.2)
    for leader in leaders:
        signal_group(leader.pid, signal.SIGKILL)
        try:
            leader.wait(10)
        except subprocess.TimeoutExpired:
            pass


class RedisServer:
    """A real redis-server on 127.0.0.1, on a free port unless ``port`` is given.

    It keeps nothing on disk by default (``--save "" --appendonly no``): a restarted
    server is empty. ``extra`` arguments follow the defaults, so they win: ``--appendonly
    yes --appendfsync always`` gives a server whose data survives ``stop``/``kill`` and
    ``start``; ``--requirepass``; ``--port 0 --tls-port N`` (then pass ``port=N``).
    ``stop``, ``kill`` and ``start`` keep the port and ``folder`` (its ``--dir``, which
    also holds its log), so a restarted server has the same URL.
    """

    def __init__(self, folder: Path, *extra: str, port: int | None = None) -> None:
        self.folder, self.extra, self.port = folder, extra, port or free_port()
        self.log = folder / f"redis-server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._client_options: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def command(self, binary: str) -> list[str]:
        defaults = ["--appendonly", "no"] if "--appendonly" not in self.extra else []
        port = [] if "--tls-port" in self.extra else ["--port", str(self.port)]
        base = [binary, "--bind", LOOPBACK, "--save", "", "--dir", str(self.folder)]
        return [*base, *defaults, *port, *self.extra]

    def start(
        self,
        *,
        password: str | None = None,
        username: str | None = None,
        ssl: bool = False,
        ssl_ca_certs: str | None = None,
        seconds: float = REDIS_START_SECONDS,
    ) -> None:
        """Start the server and wait until a client with these options gets PONG.

        The options are those the server's ``extra`` arguments ask of a client (its
        password, TLS); ``client()`` reuses them.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            raise ProgramMissing("redis-server", "run `make system-deps`")
        self._client_options = {"password": password, "username": username}
        if ssl:
            self._client_options |= {"ssl": True, "ssl_ca_certs": ssl_ca_certs}
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                self.command(binary), stdout=handle, stderr=subprocess.STDOUT
            )
        what = f"redis-server on port {self.port}"
        wait_until(
            self._pong,
            what=what,
            seconds=seconds,
            process=self.process,
            log=self.log,
            interval=0.05,
        )

    def _pong(self) -> bool:
        try:
            with self.client(socket_timeout=1) as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client of this server, with the options ``start`` was given."""
        return redis.Redis(host=LOOPBACK, port=self.port, **(self._client_options | options))

    def stop(self, seconds: float = 10) -> None:
        """SIGTERM: redis-server shuts down cleanly (an AOF is flushed). No-op when stopped."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(seconds)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, only what was already on disk survives (a crash)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
