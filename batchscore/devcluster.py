"""A long-lived Dask cluster on this machine, deployed as docker-compose deploys it.

``dask scheduler`` and ``dask worker --preload scoring.preload`` processes, the workers
with ``scoring.engine.worker_process_env``: what ``BATCHSCORE_CLUSTER=tcp://...`` points
at in the stack, without Docker. The tests and the benchmarks use it to run the
running-cluster path for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from distributed import Client

from scoring.engine import worker_process_env

BIN = Path(sys.executable).parent
START_SECONDS = 120


class RunningCluster:
    """Start a scheduler and ``workers`` single-threaded workers; ``stop`` ends them all.

    ``folder`` holds the scheduler file; ``pythonpath`` is added to the workers' (for
    model classes that are not installed, as in the tests).
    """

    def __init__(self, folder: Path, workers: int = 2, pythonpath: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "scheduler.json"
        self.file.unlink(missing_ok=True)  # a stale one would name a scheduler gone
        env = os.environ | worker_process_env()
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
        self.scheduler = _quiet(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
             "--scheduler-file", str(self.file)],
            env,
        )  # fmt: skip
        self.workers = [
            _quiet(
                [
                    "worker",
                    "--scheduler-file",
                    str(self.file),
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--dashboard-address",
                    ":0",
                    "--preload",
                    "scoring.preload",
                ],
                env,
            )  # fmt: skip
            for _ in range(workers)
        ]
        try:
            self._wait_for_scheduler_file(START_SECONDS)
            self.client = Client(scheduler_file=str(self.file), timeout=START_SECONDS)
            self.client.wait_for_workers(workers, timeout=START_SECONDS)
        except BaseException:
            self._end_processes()
            raise
        self.address: str = self.client.scheduler.address

    def _wait_for_scheduler_file(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.file.exists():
            if self.scheduler.poll() is not None:
                raise RuntimeError(
                    f"dask scheduler exited with code {self.scheduler.returncode} before "
                    f"writing {self.file}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"dask scheduler wrote no {self.file} in {seconds:.0f} s")
            time.sleep(0.1)

    def stop_scheduler(self) -> None:
        self.scheduler.terminate()
        self.scheduler.wait(30)

    def stop(self) -> None:
        self.client.close()
        self._end_processes()

    def _end_processes(self) -> None:
        processes = [*self.workers, self.scheduler]
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _quiet(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``dask <args>`` with its output discarded."""
    return subprocess.Popen(
        [str(BIN / "dask"), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
