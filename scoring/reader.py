"""Read a shard's row groups with decode running ahead of compute.

``prefetch`` runs an iterator in a background thread, ``depth`` items ahead.
Parquet decoding releases the GIL, and so does a torch forward pass, so the
next row group decodes while the current one is scored. Memory stays bounded
by ``depth`` row groups, whatever the size of the shard or the dataset.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import pyarrow as pa

from batchscore.core import storage
from scoring.shards import Piece

T = TypeVar("T")
_DONE = object()


def read_row_groups(pieces: Sequence[Piece], columns: Sequence[str]) -> Iterator[pa.Table]:
    """One table per row group, in shard order, with only the needed columns."""
    for piece in pieces:
        reader = storage.open_parquet(piece.path)  # a local file, or ranged reads of an object
        for index in piece.row_groups:
            yield reader.read_row_group(index, columns=list(columns))


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` while a thread produces up to ``depth`` of them ahead.

    An exception in the producer is raised in the consumer at the point the
    failed item would have been yielded. Closing the generator early stops the
    producer after at most one more item.
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer, never lost
            slots.put(exc)

    producer = threading.Thread(target=produce, name="batchscore-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while producer.is_alive():
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
