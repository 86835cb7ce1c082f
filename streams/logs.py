"""The worker's logging: text or JSON lines at a chosen level, bounded when something repeats.

    setup_logging("json", "INFO")         # what `sparc worker --log-format json --log-level INFO` does

- Text lines look like Faust's own (`[time] [pid] [LEVEL] message`); JSON lines are one object each:
  {"time", "level", "logger", "message", "pid"} and "exception" (the traceback) when there is one.
- A broker outage makes the Kafka clients log the same few lines thousands of times a second (aiokafka retries
  its connection in a tight loop). `RateLimitedHandler` lets through at most `burst` records per call site
  (logger, level, message template with its digits masked: Faust formats some messages itself, e.g. "producer
  buffer full size 17") in every `period` seconds and then says, once the period is over, how many it held back:
  an outage costs a bounded number of lines however long it lasts.
- A client's malformed request (an over-long URL, a bad method) is the client's error, not the server's: aiohttp
  logs it as an ERROR with a traceback; `ClientErrorFilter` turns it into one INFO line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
BURST = 10  # records per call site ...
PERIOD_S = 60.0  # ... per this many seconds
MAX_SITES = 1024  # call sites tracked at once (the oldest windows are dropped first)
_DIGITS = re.compile(r"\d+")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


JsonFormatter.converter = time.gmtime


@dataclass
class _Window:
    start: float
    passed: int = 0
    held: int = 0
    sample: logging.LogRecord | None = None


class RateLimitedHandler(logging.Handler):
    """Passes at most `burst` records per call site (logger, level, message template) per `period` seconds to
    `target`; when a period with held-back records ends, one record says how many (at the next record of any
    site, so a burst that has stopped is reported too)."""

    def __init__(self, target: logging.Handler, burst: int = BURST, period: float = PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(target.level)
        self.target, self.burst, self.period, self.clock = target, burst, period, clock
        self._windows: dict[tuple[str, int, str], _Window] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now = self.clock()
        self._report_ended(now)
        key = (record.name, record.levelno, _DIGITS.sub("#", str(record.msg)))
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_SITES:
                self._windows.pop(next(iter(self._windows)))
            window = self._windows[key] = _Window(now)
        if window.passed < self.burst:
            window.passed += 1
            self.target.handle(record)
        else:
            window.held += 1
            window.sample = record

    def _report_ended(self, now: float) -> None:
        ended = [key for key, w in self._windows.items() if now - w.start >= self.period]
        for key in ended:
            window = self._windows.pop(key)
            if window.held and window.sample is not None:
                sample = window.sample
                summary = logging.LogRecord(
                    sample.name, sample.levelno, sample.pathname, sample.lineno,
                    "%d more like this in %.0f s were not logged; the last: %s",
                    (window.held, now - window.start, sample.getMessage()), None,
                )
                self.target.handle(summary)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 (logging's name)
        self.target.setFormatter(fmt)

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        self.target.close()
        super().close()


class ClientErrorFilter(logging.Filter):
    """On aiohttp's server logger: a request the client got wrong (an HTTP 4xx parse error) becomes one INFO line
    without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            first = str(exc.message).strip().splitlines()[0][:200] if exc.message else type(exc).__name__
            record.msg, record.args = "%s (answered %d): %s", (record.getMessage(), exc.code, first)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def setup_logging(log_format: str = "text", level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Configure the root logger of this process: one handler on `stream` (stdout), rate-limited."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(RateLimitedHandler(handler))
    root.setLevel(level)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorFilter) for f in server.filters):
        server.addFilter(ClientErrorFilter())
