"""JSON log lines (``batchscore.core.logs``): one object per line, whatever the message."""

from __future__ import annotations

import io
import json
import logging

from batchscore.core.logs import configure, json_handler


def test_each_record_is_one_json_line_with_its_exception() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("batchscore.test_logs")
    saved = logging.getLogger().handlers[:]
    try:
        configure(json_handler(stream), level=logging.INFO, loggers=["batchscore"])
        logger.info("two\nlines %s", "here", extra={"fields": {"run_id": "r1", "level": "x"}})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        logger.debug("not shown at INFO")
    finally:
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        logging.captureWarnings(False)
    lines = stream.getvalue().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert len(lines) == 2
    assert first["message"] == "two\nlines here" and first["level"] == "INFO"
    assert first["logger"] == "batchscore.test_logs" and first["run_id"] == "r1"
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]
