"""Files that survive a power loss: fsync the data before a rename, the folder after.

Used by the run's manifest (``jobs.manifest``) and the output parts
(``scoring.engine``): "a part that exists is complete" and "the manifest says what
happened" hold only if the rename that publishes a file reaches the disk after its data.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename or a new file in it lasts)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
