"""Structured logs: one JSON object per line on stderr, with the request id where there is one.

log.info("prefill done", extra={"request_id": rid, "cached_tokens": 480})
"""

from __future__ import annotations

import json
import logging
import sys
import time

# `extra` fields a log line carries when given (everything else in a record is logging's own)
FIELDS = (
    "service",
    "request_id",
    "session_id",
    "node",
    "prefill_node",
    "decode_node",
    "reason",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "ttft_ms",
    "compute_ms",
    "together",
    "kv_bytes",
    "attempt",
    "code",
    "healthy",
    "error",
    "why",
    "migration",
    "tokens_sent",
    "replay_tokens",
    "bad_blocks",
    "blocks",
    "sequence_tokens",
)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k in FIELDS if (v := record.__dict__.get(k)) is not None})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(service: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    logging.basicConfig(level=level, handlers=[handler], force=True)
