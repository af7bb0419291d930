"""Real services on free loopback ports, for the tests, the benchmarks and the demo.

Like ``distributed.utils_test``, this module is installed with the package so that
``bench/`` and ``batchscore demo`` start servers and wait for them exactly as the tests
do; no library module imports it (tests/unit/test_layers.py puts it in the top layer).

- ``free_port``: a port on 127.0.0.1 that the kernel handed out a moment ago.
- ``RedisServer``: a real ``redis-server`` that a caller may stop, kill and start again.
- ``RedisClusterServers``: a real Redis Cluster of six ``redis-server`` processes (three
  primaries, three replicas) made by ``redis-cli --cluster create``, whose primaries a
  caller may kill (a replica is promoted) and whose slots it may move (reshard).
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
from dataclasses import dataclass
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


CLUSTER_SLOTS = 16_384
CLUSTER_NODE_TIMEOUT_MS = 1000  # failure detection: a replica is promoted ~1-3 s after a kill
CLUSTER_NODE_START_SECONDS = 30.0  # six servers (TLS ones too) on a busy machine


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of ``CLUSTER NODES``, as the tests need it."""

    node_id: str
    port: int
    primary: bool
    failed: bool
    primary_id: str | None
    slots: int

    @classmethod
    def parse(cls, address: str, fields: dict[str, Any]) -> ClusterNodeInfo:
        """One node of ``CLUSTER NODES`` as redis-py's reply parser gives it."""
        flags = str(fields["flags"]).split(",")
        slots = sum(int(r[-1]) - int(r[0]) + 1 for r in fields.get("slots") or [])
        return cls(
            node_id=str(fields["node_id"]),
            port=int(address.split("@")[0].rsplit(":", 1)[1]),
            primary="master" in flags,
            failed="fail" in flags or "fail?" in flags,
            primary_id=None if fields["master_id"] == "-" else str(fields["master_id"]),
            slots=slots,
        )


class RedisClusterServers:
    """A real Redis Cluster on 127.0.0.1: ``primaries`` primaries with one replica each.

    Six ``redis-server --cluster-enabled yes`` processes on free ports (nothing on disk,
    as ``RedisServer``), joined by ``redis-cli --cluster create --cluster-replicas 1``;
    ``start`` returns once every node reports ``cluster_state:ok`` and every node gives
    the same slot map. ``url`` is batchscore's ``redis+cluster://`` URL with every node as
    a seed. ``kill_primary`` crashes a primary and returns once its replica serves its
    slots; ``reshard`` moves slots (and their keys) between primaries as an operator does.
    """

    def __init__(
        self,
        folder: Path,
        *extra: str,
        primaries: int = 3,
        node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS,
        password: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key) for TLS only, clients, bus and replication alike,
        the certificate its own CA (``rediss+cluster://`` URLs with ``ssl_ca_certs``)."""
        self.folder, self.password, self.tls = folder, password, tls
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self.nodes: list[RedisServer] = []
        for _ in range(2 * primaries):
            port = free_port()
            secure = []
            if tls is not None:
                secure = [
                    "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes",
                    "--tls-replication", "yes", "--tls-cert-file", str(tls[0]),
                    "--tls-key-file", str(tls[1]), "--tls-ca-cert-file", str(tls[0]),
                    "--tls-auth-clients", "no",
                ]  # fmt: skip
            home = folder / f"node-{port}"  # its own --dir: replicas write RDB files there
            home.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                RedisServer(
                    home,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    # the bus port is port + 10000 unless given: past 55535, no such port
                    "--cluster-port", str(free_port()),
                    # a replica of a killed primary always takes over, however long idle
                    "--cluster-replica-validity-factor", "0",
                    *auth,
                    *secure,
                    *extra,
                    port=port,
                )
            )  # fmt: skip

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        seeds = ",".join(f"{LOOPBACK}:{port}" for port in self.ports)
        if self.tls is not None:
            return f"rediss+cluster://{seeds}/?ssl_ca_certs={self.tls[0]}"
        return f"redis+cluster://{seeds}/"

    def _start_node(self, node: RedisServer) -> None:
        ca = None if self.tls is None else str(self.tls[0])
        node.start(
            password=self.password,
            ssl=self.tls is not None,
            ssl_ca_certs=ca,
            seconds=CLUSTER_NODE_START_SECONDS,
        )

    def start(self, seconds: float = 60) -> None:
        """Start the nodes and make the cluster; a failure stops every node started."""
        try:
            self._create(seconds)
        except BaseException:
            self.stop()
            raise

    def _create(self, seconds: float) -> None:
        for node in self.nodes:
            self._start_node(node)
        binary = shutil.which("redis-cli")
        if binary is None:
            raise ProgramMissing("redis-cli", "run `make system-deps`")
        addresses = [f"{LOOPBACK}:{port}" for port in self.ports]
        self._cli(
            "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"
        )  # fmt: skip
        self.wait_ok(seconds)
        try:
            wait_until(self.replicated, what="the Redis Cluster's replicas", seconds=seconds)
        except ServiceTimeout as exc:  # say how far each node got
            raise ServiceTimeout(exc.what, exc.seconds, last=self._replication()) from None

    def _cli(self, *args: str, timeout: float = 300) -> str:
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        if self.tls is not None:
            auth += ["--tls", "--cacert", str(self.tls[0])]
        done = subprocess.run(
            ["redis-cli", *auth, *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise ServiceError(
                f"redis-cli {' '.join(args)} failed with code {done.returncode}:\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done.stdout

    def live(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def cluster_nodes(self) -> list[ClusterNodeInfo]:
        """The cluster as the first live node sees it."""
        with self.live()[0].client(socket_timeout=2) as client:
            nodes = client.execute_command("CLUSTER NODES")
        return [ClusterNodeInfo.parse(address, fields) for address, fields in nodes.items()]

    def primaries(self) -> list[ClusterNodeInfo]:
        """The primaries that serve slots now (a failed one excluded)."""
        return [n for n in self.cluster_nodes() if n.primary and not n.failed and n.slots]

    def _slot_maps(self) -> list[tuple[tuple[int, int, int], ...]] | None:
        maps = []
        try:
            for node in self.live():
                with node.client(socket_timeout=2) as client:
                    if client.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                        return None
                    slots = client.execute_command("CLUSTER SLOTS")
                maps.append(tuple(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots)))
        except (redis.RedisError, OSError):
            return None
        return maps

    def replicated(self) -> bool:
        """Every primary has an online replica, and the slot map lists it (a replica
        still syncing could be promoted empty, and a client reading the map then sees
        no replica)."""
        try:
            primaries = self.primaries()
            for primary in primaries:
                with self.node(primary.port).client(socket_timeout=2) as client:
                    info = client.info("replication")
                    if info.get("slave0", {}).get("state") != "online":
                        return False
                    slots = client.execute_command("CLUSTER SLOTS")
                if any(len(entry) < 4 for entry in slots):
                    return False
        except (redis.RedisError, OSError):
            return False
        return bool(primaries)

    def _replication(self) -> str:
        """Each node's role and its replication's state, as it answers now."""
        states = []
        for node in self.nodes:
            try:
                with node.client(socket_timeout=2) as client:
                    info = client.info("replication")
                    slots = client.execute_command("CLUSTER SLOTS")
            except (redis.RedisError, OSError) as exc:
                states.append(f"{node.port}: {type(exc).__name__}: {exc}")
                continue
            fields = ("role", "connected_slaves", "slave0", "master_link_status", "master_port")
            found = ", ".join(f"{k}={info[k]}" for k in fields if k in info)
            listed = sum(1 for entry in slots if len(entry) >= 4)
            states.append(f"{node.port}: {found}; slot ranges with a replica {listed}/{len(slots)}")
        return "; ".join(states)

    def consistent(self, without: int | None = None) -> bool:
        """Every live node says ``cluster_state:ok`` and gives the same full slot map (in
        which the primary on port ``without`` serves no slot)."""
        maps = self._slot_maps()
        if not maps or any(m != maps[0] for m in maps):
            return False
        if any(port == without for _, _, port in maps[0]):
            return False
        return sum(end - start + 1 for start, end, _ in maps[0]) == CLUSTER_SLOTS

    def wait_ok(self, seconds: float = 60) -> None:
        wait_until(self.consistent, what="the Redis Cluster's slot map", seconds=seconds)

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def port_of_slot(self, slot: int) -> int:
        with self.live()[0].client(socket_timeout=2) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        raise ServiceError(f"no node serves slot {slot}")

    def slots_of(self, port: int) -> list[int]:
        """The slots the primary on ``port`` serves, ascending (the order in which
        ``redis-cli --cluster reshard`` takes them from a source)."""
        with self.live()[0].client(socket_timeout=2) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        owned = [range(int(r[0]), int(r[1]) + 1) for r in ranges if int(r[2][1]) == port]
        return sorted(slot for block in owned for slot in block)

    def kill_primary(self, port: int | None = None, seconds: float = 60) -> int:
        """SIGKILL a primary (``port``, or the first one), then wait until a replica has
        taken its slots and every live node agrees on the map; the killed port."""
        victim = port or self.primaries()[0].port
        self.node(victim).kill()
        wait_until(
            lambda: self.consistent(without=victim),
            what=f"a replica's promotion after primary {victim} was killed",
            seconds=seconds,
            interval=0.2,
        )
        return victim

    def restart(self, port: int, seconds: float = 60) -> None:
        """Start a killed node again: it rejoins (empty) as a replica of its successor."""
        self._start_node(self.node(port))
        self.wait_ok(seconds)
        wait_until(self.replicated, what="the Redis Cluster's replicas", seconds=seconds)

    def reshard(self, slots: int, source: int, target: int, *, pipeline: int = 100) -> None:
        """Move ``slots`` slots and their keys from the primary on port ``source`` to the
        one on ``target`` (``redis-cli --cluster reshard``), then wait for one map."""
        ids = {n.port: n.node_id for n in self.cluster_nodes()}
        self._cli(
            "--cluster", "reshard", f"{LOOPBACK}:{source}",
            "--cluster-from", ids[source], "--cluster-to", ids[target],
            "--cluster-slots", str(slots), "--cluster-yes",
            "--cluster-pipeline", str(pipeline),
        )  # fmt: skip
        self.wait_ok()

    def begin_slot_move(self, slot: int, target: int) -> int:
        """Mark ``slot`` migrating from its primary to the one on port ``target`` (as
        ``redis-cli --cluster reshard`` does first); the source's port. Until
        ``finish_slot_move``, the source answers ASK for keys of the slot it lacks."""
        source = self.port_of_slot(slot)
        ids = {n.port: n.node_id for n in self.cluster_nodes()}
        with self.node(target).client(socket_timeout=5) as client:
            client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        with self.node(source).client(socket_timeout=5) as client:
            client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        return source

    def migrate_keys(self, slot: int, target: int, keys: Sequence[bytes] | None = None) -> None:
        """MIGRATE ``keys`` (default: every key of the slot) of a migrating slot."""
        source = self.port_of_slot(slot)
        with self.node(source).client(socket_timeout=30) as client:
            if keys is None:
                keys = client.execute_command("CLUSTER GETKEYSINSLOT", slot, 1_000_000)
            if keys:
                auth = ["AUTH", self.password] if self.password else []
                client.execute_command(
                    "MIGRATE", LOOPBACK, target, "", 0, 30_000, *auth, "KEYS", *keys
                )

    def finish_slot_move(self, slot: int, target: int) -> None:
        """Move what is left of the slot and give it to ``target`` on every primary."""
        self.migrate_keys(slot, target)
        source = self.port_of_slot(slot)
        target_id = next(n.node_id for n in self.cluster_nodes() if n.port == target)
        others = [p.port for p in self.primaries() if p.port not in (source, target)]
        for port in (target, source, *others):  # the order redis-cli --cluster uses
            with self.node(port).client(socket_timeout=5) as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        self.wait_ok()

    def flush(self) -> None:
        """Empty every primary (FLUSHALL), for a cluster shared by several tests."""
        ports = {p.port for p in self.primaries()}
        for node in self.live():
            if node.port in ports:
                with node.client(socket_timeout=300) as client:  # millions of keys
                    client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except subprocess.TimeoutExpired:
                node.kill()

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
