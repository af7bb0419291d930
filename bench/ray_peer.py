"""The Ray Data peer, run in its own venv by score_bench.py: prints rows/s as JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

N_FEATURES = 64
NAMES = [f"f{i:02d}" for i in range(N_FEATURES)]


class Predict:
    def __init__(self, model_dir: str) -> None:
        torch.set_num_threads(1)
        self.model = torch.load(Path(model_dir) / "data" / "model.pth", weights_only=False).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = np.stack([batch[n] for n in NAMES], axis=1).astype(np.float32)
        with torch.inference_mode():
            scores = self.model(torch.from_numpy(features)).numpy()[:, 0]
        return {"id": batch["id"], "score": scores}


def main() -> None:
    folder, model_dir, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    # Half a CPU per model actor leaves room for the read tasks: with whole CPUs, two actors
    # on a two-core machine hold every slot and the reads never get scheduled.
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    data = ray.data.read_parquet(folder, columns=["id", *NAMES])
    scored = data.map_batches(
        Predict,
        fn_constructor_args=(model_dir,),
        batch_size=32_768,
        concurrency=workers,
        num_cpus=0.5,
        batch_format="numpy",
    )
    scored.write_parquet(out)
    rows = ray.data.read_parquet(out).count()
    print(json.dumps({"rows_per_second": rows / (time.perf_counter() - started), "rows": rows}))


if __name__ == "__main__":
    main()
