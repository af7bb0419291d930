"""A namespace's bookkeeping and the values every store records: pure, no I/O.

A namespace's bookkeeping (live pointer, publish history, version records,
run → version map) is one ``NamespaceState`` document. Stores keep it under one
key and change it only inside one atomic read-modify-write (an LMDB write
transaction, a Redis WATCH/MULTI), so publishing is one atomic step and a
reader that reads the state once sees one consistent live version.

``NamespaceState``'s methods are pure: they take the state and return a new one,
and the stores carry out the result (write keys, delete old versions).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Literal
from zlib import crc32

from pydantic import BaseModel, ConfigDict, Field

from kv_export.encoding import CANARY_SLOTS, ENCODING
from kv_export.errors import (
    AlreadyPublished,
    BadCanaryPercent,
    CanaryRefused,
    VersionExpired,
    VersionIncomplete,
    VersionNotFound,
    VersionOutOfOrder,
)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _instant(stamp: str) -> datetime:
    """An ISO timestamp as an aware datetime; a naive one is UTC (Airflow's dates are)."""
    moment = datetime.fromisoformat(stamp)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _expiry(moment: datetime, seconds: int) -> str:
    """``seconds`` after ``moment``, rounded up to a whole second: a version lives at least
    its TTL. (Adding the TTL to the completion's stamp, which has whole seconds, cut up to
    a second off it: a version with a 1 s TTL could expire before its publish.)"""
    at = moment + timedelta(seconds=seconds)
    if at.microsecond:
        at = at.replace(microsecond=0) + timedelta(seconds=1)
    return at.isoformat(timespec="seconds")


class PartInfo(BaseModel):
    """One output part of the run: where it is and which keys it holds."""

    path: str
    rows: int
    min_key: str | int | None = None
    max_key: str | int | None = None


class VersionInfo(BaseModel):
    """What a version is: written once at export, read by the lookup API."""

    version: int
    run_id: str
    state: Literal["loading", "complete"] = "loading"
    created_at: str = Field(default_factory=utcnow)
    completed_at: str | None = None
    published_at: str | None = None
    expected_keys: int = 0
    key_count: int = 0
    buckets: int = 1
    encoding: int = ENCODING  # the layout it was written in; readers follow it
    outputs: list[str]
    model_name: str
    model_version: str
    scored_at: str
    key_column: str
    key_type: Literal["int", "string"] = "string"
    output_dir: str | None = None
    parts: list[PartInfo] = Field(default_factory=list)
    expires_at: str | None = None  # set at completion when the namespace has a TTL
    # What the data is as of: the logical date of a DAG run, the creation of a CLI run.
    # Versions go live in this order (``order``); older records fall back to created_at.
    data_as_of: str | None = None
    # The MLflow run that recorded the scoring run (``jobs.tracking``), when there is one.
    mlflow_run_id: str | None = None

    @property
    def order(self) -> VersionOrder:
        """Where the version stands in the namespace's order: data date, then number."""
        return VersionOrder(data_as_of=self.data_as_of or self.created_at, version=self.version)

    def expired(self, now: datetime | None = None) -> bool:
        """Past its TTL: every store then answers lookups in it as not found."""
        if self.expires_at is None:
            return False
        return (now or datetime.now(UTC)) >= datetime.fromisoformat(self.expires_at)


class NewVersion(BaseModel):
    """What the exporter knows about a version before it is allocated a number."""

    run_id: str
    expected_keys: int
    buckets: int = 1
    outputs: list[str]
    model_name: str
    model_version: str
    scored_at: str
    key_column: str
    key_type: Literal["int", "string"] = "string"
    output_dir: str | None = None
    parts: list[PartInfo] = Field(default_factory=list)
    data_as_of: str | None = None
    mlflow_run_id: str | None = None


class VersionOrder(BaseModel):
    """The ordering key of a version: the date its data is as of, then its number."""

    data_as_of: str
    version: int

    def key(self) -> tuple[datetime, int]:
        return _instant(self.data_as_of), self.version

    def __lt__(self, other: VersionOrder) -> bool:  # type: ignore[override]
        return self.key() < other.key()


class Canary(BaseModel):
    """A version answering a share of the keys beside the live one: the keys whose
    ``canary_slot`` is below ``slots`` (``percent`` × 100) go to it, every other key to
    the live version. Deterministic per key, so a caller sees one version per key.
    Frozen: a change of share is a new ``Canary`` (``crc_bound`` is computed once)."""

    model_config = ConfigDict(frozen=True)

    version: int
    percent: float
    started_at: str = Field(default_factory=utcnow)
    force: bool = False  # started out of order by an operator: promoted the same way

    @property
    def slots(self) -> int:
        return round(self.percent * 100)

    @cached_property
    def crc_bound(self) -> int:
        """``canary_slot(key) < slots`` as one comparison of the key's CRC-32: the slot is
        ``crc × CANARY_SLOTS >> 32``, below ``slots`` exactly when the CRC is below this."""
        return -(-(self.slots << 32) // CANARY_SLOTS)

    def takes(self, key: bytes) -> bool:
        """The rule: does this key (the bytes the store holds it as) go to the canary?"""
        return crc32(key) < self.crc_bound


def canary_percent(percent: float) -> float:
    """``percent`` checked: strictly between 0 and 100, a whole number of 0.01 % slots."""
    slots = percent * 100
    if not (0 < percent < 100) or abs(slots - round(slots)) > 1e-6:
        raise BadCanaryPercent(
            f"A canary's share of keys cannot be {percent:g} %",
            expected=f"a percentage strictly between 0 and 100, in steps of "
            f"{100 / CANARY_SLOTS:g} (such as 10 or 2.5)",
            found=f"{percent:g}",
            fix="Give the share as e.g. --canary 10%; to serve every key from the canary "
            "promote it, to serve none abort it",
        )
    return round(slots) / 100


class NamespaceState(BaseModel):
    """One namespace's bookkeeping; every change is a pure method returning a new state.

    Invariants: ``live`` is in ``versions`` and is ``history[-1]``; a version in
    ``deleting`` is in no other field, and its data is being (or was not yet)
    deleted; a store removes it from ``deleting`` only after its data is gone,
    so a crash between the two leaves a record for ``gc`` to finish.
    """

    seq: int = 0
    live: int | None = None
    history: list[int] = Field(default_factory=list)  # published, oldest first; last is live
    versions: dict[int, VersionInfo] = Field(default_factory=dict)
    runs: dict[str, int] = Field(default_factory=dict)
    ttl_seconds: int | None = None  # lifetime of each version's data after it is loaded
    deleting: dict[int, VersionInfo] = Field(default_factory=dict)
    # The newest version ever published (not rolled back to): a publish must be newer.
    # A rollback leaves it where it is, so it pins the namespace against older runs.
    newest: VersionOrder | None = None
    # A version answering a share of the keys beside the live one (``Canary``); its
    # version is complete, in ``versions``, never published, and never collected.
    canary: Canary | None = None

    def live_info(self) -> VersionInfo | None:
        return self.versions.get(self.live) if self.live is not None else None

    def canary_info(self) -> VersionInfo | None:
        return self.versions.get(self.canary.version) if self.canary is not None else None

    def version_for(self, key: bytes) -> tuple[VersionInfo | None, bool]:
        """The version that answers ``key`` and whether it is the canary: the rule every
        reader (lookup, batch fallback, drift check) follows."""
        canary = self.canary
        if canary is not None and canary.takes(key):
            return self.versions.get(canary.version), True
        return self.live_info(), False

    def start_canary(
        self,
        namespace: str,
        version: int,
        percent: float,
        *,
        force: bool = False,
        now: datetime | None = None,
    ) -> NamespaceState:
        """Serve ``version`` to ``percent`` % of the keys beside the live version, which
        stays live. Starting the running canary again changes nothing (a retried run).
        Refused as a publish is (incomplete, published before, expired, out of order
        unless ``force``), and with ``CanaryRefused`` when there is no live version to
        compare with or another canary runs."""
        share = canary_percent(percent)
        if self.canary is not None and self.canary.version == version:
            return self
        info = self._require(namespace, version)
        if self.live is None:
            raise CanaryRefused(
                f"Namespace '{namespace}' has no live version to canary version {version} against",
                expected="a live version that answers the keys outside the canary",
                fix=f"Publish it without a canary: batchscore step publish RUN_DIR "
                f"(version {version} of run {info.run_id})",
            )
        if self.canary is not None:
            raise self._canary_runs(namespace, f"start a canary of version {version}")
        if self.live == version:
            raise CanaryRefused(
                f"Version {version} of namespace '{namespace}' is live already",
                expected="a version that is not live",
            )
        # The checks of a publish, on a state where the canary would be live.
        trial, _ = self.publish(
            namespace, version, keep=len(self.history) + 1, force=force, now=now
        )
        del trial
        state = self.model_copy(deep=True)
        state.canary = Canary(version=version, percent=share, force=force)
        return state

    def set_canary_percent(self, namespace: str, percent: float) -> NamespaceState:
        """Move the running canary to ``percent`` %: keys below the old share stay in it
        when the share grows (the slots are nested)."""
        share = canary_percent(percent)
        canary = self._require_canary(namespace, f"move a canary to {percent:g} %")
        if canary.percent == share:
            return self
        state = self.model_copy(deep=True)
        state.canary = Canary(
            version=canary.version, percent=share, started_at=canary.started_at, force=canary.force
        )
        return state

    def promote(
        self, namespace: str, keep: int, *, now: datetime | None = None
    ) -> tuple[NamespaceState, list[VersionInfo]]:
        """Make the canary live in one step, as a publish of it would (history, retention,
        the order's high mark), and end the canary."""
        canary = self._require_canary(namespace, "promote a canary")
        state = self.model_copy(deep=True)
        state.canary = None
        return state.publish(namespace, canary.version, keep, force=canary.force, now=now)

    def abort(self, namespace: str) -> NamespaceState:
        """End the canary: every key goes back to the live version. The canary's version
        stays, never published, for retention to collect as any other."""
        self._require_canary(namespace, "abort a canary")
        state = self.model_copy(deep=True)
        state.canary = None
        return state

    def _require_canary(self, namespace: str, doing: str) -> Canary:
        if self.canary is None:
            raise CanaryRefused(
                f"Namespace '{namespace}' has no canary running: cannot {doing}",
                expected="a canary started with batchscore step publish RUN_DIR --canary P% "
                "(or batchscore run ... --canary P%)",
                found=f"live version {self.live}" if self.live is not None else "no live version",
            )
        return self.canary

    def _canary_runs(self, namespace: str, doing: str) -> CanaryRefused:
        assert self.canary is not None
        return CanaryRefused(
            f"Namespace '{namespace}' has a canary running (version {self.canary.version} at "
            f"{self.canary.percent:g} % beside live version {self.live}): cannot {doing}",
            expected="no canary running",
            fix=f"Promote it (batchscore canary {namespace} --promote) or abort it "
            f"(batchscore canary {namespace} --abort) first",
        )

    def begin(self, new: NewVersion) -> tuple[NamespaceState, VersionInfo]:
        """Allocate a version for a run, or return the run's existing one (a retry)."""
        existing = self.runs.get(new.run_id)
        if existing is not None and existing in self.versions:
            return self, self.versions[existing]
        state = self.model_copy(deep=True)
        state.seq += 1
        info = VersionInfo(version=state.seq, **new.model_dump())
        state.versions[info.version] = info
        state.runs[new.run_id] = info.version
        return state, info

    def complete(self, namespace: str, version: int, key_count: int) -> NamespaceState:
        state = self.model_copy(deep=True)
        info = state._require(namespace, version)
        info.state = "complete"
        info.key_count = key_count
        now = datetime.now(UTC)
        info.completed_at = now.isoformat(timespec="seconds")
        if state.ttl_seconds:
            info.expires_at = _expiry(now, state.ttl_seconds)
        return state

    def set_ttl(self, ttl_seconds: int | None) -> NamespaceState:
        """Record the namespace's TTL; versions completed from now on expire after it."""
        state = self.model_copy(deep=True)
        state.ttl_seconds = ttl_seconds or None
        return state

    def publish(
        self,
        namespace: str,
        version: int,
        keep: int,
        *,
        force: bool = False,
        now: datetime | None = None,
    ) -> tuple[NamespaceState, list[VersionInfo]]:
        """Make ``version`` live; return the new state and the versions to delete.

        Publishing the live version again changes nothing. Versions that were
        published once and fell out of the last ``keep`` are dropped; versions
        never published (another run's export in flight) are left alone.
        Refused: an expired version (``VersionExpired``, always), and a version
        whose data is older than the newest ever published (``VersionOutOfOrder``)
        unless ``force``; a forced publish leaves the order's high mark as it was.
        """
        if self.canary is not None:
            if self.canary.version == version:  # publishing the canary promotes it
                return self.promote(namespace, keep, now=now)
            raise self._canary_runs(namespace, f"publish version {version}")
        info = self._require(namespace, version)
        if info.state != "complete":
            raise VersionIncomplete(
                f"Version {version} of namespace '{namespace}' cannot be published",
                expected="a completely loaded version",
                found=f"state '{info.state}' with {info.key_count} keys",
                fix="Re-run the export step of that run, then publish",
            )
        if self.live == version:
            return self, []
        if info.published_at is not None:
            raise AlreadyPublished(
                f"Version {version} of namespace '{namespace}' was published before and is "
                f"no longer live (live is {self.live})",
                fix=f"To serve it again use: batchscore rollback {namespace} --to {version}",
            )
        _refuse_expired(namespace, info, now, "published")
        newest = self._newest()
        if newest is not None and info.order < newest and not force:
            raise self._out_of_order(namespace, info, newest)
        state = self.model_copy(deep=True)
        state.versions[version].published_at = utcnow()
        state.history = [v for v in state.history if v != version] + [version]
        state.live = version
        state.newest = info.order if newest is None or newest < info.order else newest
        return state._drop_beyond(keep)

    def _newest(self) -> VersionOrder | None:
        """The order's high mark; a state written before it existed uses its live version."""
        live = self.live_info()
        if self.newest is None:
            return live.order if live is not None else None
        return self.newest

    def _out_of_order(
        self, namespace: str, info: VersionInfo, newest: VersionOrder
    ) -> VersionOutOfOrder:
        where = (
            "is live"
            if newest.version == self.live
            else f"was published before the namespace was rolled back to version {self.live}"
        )
        return VersionOutOfOrder(
            f"Version {info.version} of namespace '{namespace}' (run {info.run_id}, data as of "
            f"{info.order.data_as_of}) is older than version {newest.version} (data as of "
            f"{newest.data_as_of}), which {where}; an older run never replaces newer predictions",
            expected=f"a version with data newer than {newest.data_as_of}",
            fix="If the older data should be served anyway (a rollback does it for a kept "
            "version: batchscore rollback), publish it with force: batchscore step publish "
            "RUN_FOLDER --force, or the DAG's force parameter",
        )

    def rollback(
        self, namespace: str, to: int | None = None, *, now: datetime | None = None
    ) -> NamespaceState:
        """Make the previous kept version (or ``to``) live: an operator's choice, so no
        order check; the order's high mark stays, so the next publish of a run older than
        it is refused (the rollback is not undone by a late run), a newer run publishes.
        An expired target is refused."""
        if self.live is None:
            raise VersionNotFound(
                f"Namespace '{namespace}' has no live version to roll back from",
                fix="Publish a version first",
            )
        if self.canary is not None:
            raise self._canary_runs(namespace, "roll back")
        state = self.model_copy(deep=True)
        if to is None:
            if len(state.history) < 2:
                raise VersionNotFound(
                    f"Namespace '{namespace}' keeps no version before the live one "
                    f"(version {self.live})",
                    expected="at least two kept versions",
                    found=f"kept versions {state.history}",
                    fix="Raise BATCHSCORE_KEEP_VERSIONS to keep more versions for rollback",
                )
            state.history.pop()
        else:
            target = state._require(namespace, to)
            if target.state != "complete":
                raise VersionIncomplete(
                    f"Version {to} of namespace '{namespace}' is still loading",
                    expected="a completely loaded version",
                )
            state.history = [v for v in state.history if v != to] + [to]
        target = state.versions[state.history[-1]]
        _refuse_expired(namespace, target, now, "rolled back to")
        newest = self._newest()
        state.newest = target.order if newest is None or newest < target.order else newest
        state.live = target.version
        state.versions[state.live].published_at = utcnow()
        return state

    def drop(self, version: int) -> NamespaceState:
        """Forget a version for readers and move it to ``deleting`` until its data is gone."""
        state = self.model_copy(deep=True)
        info = state.versions.pop(version, None)
        if info is not None:
            state.deleting[version] = info
        state.history = [v for v in state.history if v != version]
        state.runs = {r: v for r, v in state.runs.items() if v != version}
        if state.canary is not None and state.canary.version == version:
            state.canary = None  # its keys go back to the live version
        return state

    def forget(self, versions: Sequence[int]) -> NamespaceState:
        """The data of these versions is deleted: drop their ``deleting`` records."""
        state = self.model_copy(deep=True)
        for version in versions:
            state.deleting.pop(version, None)
        return state

    def gc(
        self,
        keep: int,
        now: datetime | None = None,
        *,
        loading_grace_seconds: int | None = None,
        spare_run: str | None = None,
    ) -> tuple[NamespaceState, list[VersionInfo]]:
        """Everything retention lets go: return the new state and the versions to delete.

        Goes: published versions beyond the last ``keep``; complete versions never
        published whose data is older than the newest published (superseded: only
        ``force`` could publish them); versions still loading ``loading_grace_seconds``
        after they began (an export that crashed; never with ``None``), except
        ``spare_run``'s; expired versions that are not live; and versions left in
        ``deleting`` by an interrupted delete. Stays: the live version, the last
        ``keep`` published, the canary, any complete never-published version newer than
        the live one (about to be published) and any export younger than the grace period.
        """
        moment = now or datetime.now(UTC)
        state, doomed = self._drop_beyond(keep)
        newest = self._newest()

        canary = state.canary.version if state.canary is not None else None

        def is_stale(info: VersionInfo) -> bool:
            if info.version in (state.live, canary):
                return False
            if info.expired(moment):
                return True
            if info.published_at is not None:
                return False
            if info.state == "loading":
                return (
                    loading_grace_seconds is not None
                    and info.run_id != spare_run
                    and moment - _instant(info.created_at)
                    >= timedelta(seconds=loading_grace_seconds)
                )
            return newest is not None and info.order < newest

        stale = [info for info in state.versions.values() if is_stale(info)]
        for info in stale:
            state = state.drop(info.version)
        leftovers = [info for v, info in self.deleting.items()]
        return state, doomed + stale + leftovers

    def _drop_beyond(self, keep: int) -> tuple[NamespaceState, list[VersionInfo]]:
        kept = set(self.history[-keep:])
        doomed = [
            info
            for v, info in self.versions.items()
            if v not in kept and v != self.live and info.published_at is not None
        ]
        state = self.model_copy(deep=True)
        for info in doomed:
            state = state.drop(info.version)
        state.history = [v for v in state.history if v in kept]
        return state, doomed

    def _require(self, namespace: str, version: int) -> VersionInfo:
        info = self.versions.get(version)
        if info is None:
            raise VersionNotFound(
                f"Namespace '{namespace}' has no version {version}",
                expected=f"one of {sorted(self.versions)}" if self.versions else None,
                found="no versions" if not self.versions else None,
            )
        return info


def _refuse_expired(namespace: str, info: VersionInfo, now: datetime | None, doing: str) -> None:
    if info.expired(now):
        raise VersionExpired(
            f"Version {info.version} of namespace '{namespace}' (run {info.run_id}) cannot be "
            f"{doing}: its TTL passed at {info.expires_at}",
            expected="a version within its TTL (BATCHSCORE_VERSION_TTL_SECONDS)",
            fix="Run the pipeline again to load fresh predictions, or roll back to a kept "
            "version that has not expired (batchscore versions NAMESPACE lists them)",
        )


__all__ = [
    "Canary",
    "NamespaceState",
    "NewVersion",
    "PartInfo",
    "VersionInfo",
    "VersionOrder",
    "canary_percent",
    "utcnow",
]
