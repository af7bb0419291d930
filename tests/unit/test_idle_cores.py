"""A shard scored while the worker's other threads have nothing left takes their cores
(``scoring.engine.ModelPlugin.share_cores``, before each batch's forward pass)."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import pytest

from scoring.engine import ModelPlugin
from scoring.spec import ModelSpec


def plugin(threads: int, slots: int, device: str = "cpu") -> ModelPlugin:
    spec = ModelSpec(("f",), ("p",), "pytorch", "pickle", "columns")
    made = ModelPlugin("unused", spec, threads, device, "fp32")
    made._slots = slots
    made._predictor = SimpleNamespace(device=device)  # type: ignore[assignment]
    return made


def in_a_thread(work: Any) -> Any:
    """torch's thread count is per thread: run where it cannot leak into the test's own."""
    found: list[Any] = []
    worker = threading.Thread(target=lambda: found.append(work()))
    worker.start()
    worker.join()
    return found[0]


def share_while(made: ModelPlugin, others: int) -> tuple[int, int]:
    """The share one shard gets while ``others`` more are scored; torch's count after."""
    import torch

    def work() -> tuple[int, int]:
        with ExitStack() as scoring:
            for _ in range(others + 1):
                scoring.enter_context(made.scoring())
            return made.share_cores(), torch.get_num_threads()

    return in_a_thread(work)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("threads", "slots", "others", "expected"),
    [
        (1, 2, 1, 1),  # both threads of the in-process cluster busy: one core each
        (1, 2, 0, 2),  # the last shard alone: both cores
        (1, 4, 1, 2),  # two of four threads left: two cores each
        (1, 4, 2, 1),  # three of four: never fewer than `threads`
        (2, 1, 0, 2),  # a worker process of one thread keeps its own count
        (1, 1, 0, 1),
    ],
)
def test_the_share_follows_the_shards_being_scored(
    threads: int, slots: int, others: int, expected: int
) -> None:
    assert share_while(plugin(threads, slots), others) == (expected, expected)


def test_a_gpu_worker_keeps_its_thread_count() -> None:
    made = plugin(1, 2, device="cuda")
    assert in_a_thread(made.share_cores) == 1


def test_a_thread_that_ends_its_shard_is_no_longer_counted() -> None:
    made = plugin(1, 2)
    with made.scoring():
        with made.scoring():
            assert made._scoring == 2
        assert made._scoring == 1
    assert made._scoring == 0
    with pytest.raises(RuntimeError), made.scoring():
        raise RuntimeError("a shard that fails still leaves")
    assert made._scoring == 0


def test_a_copy_sent_to_a_worker_starts_with_nothing_scored() -> None:
    import pickle

    made = plugin(1, 2)
    made._scoring = 2
    copy = pickle.loads(pickle.dumps(made))
    assert (copy._scoring, copy._slots, copy.threads) == (0, 1, 1)
