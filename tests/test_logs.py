"""The worker's logging (streams.logs): JSON lines, a bounded number of lines for a flood of repeats (a broker
outage), and a client's malformed request as one INFO line instead of an ERROR with a traceback."""

from __future__ import annotations

import io
import json
import logging

import pytest

from streams.logs import ClientErrorFilter, JsonFormatter, RateLimitedHandler, setup_logging


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def record(msg, *args, name="aiokafka.client", level=logging.ERROR, exc_info=None):
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_a_flood_of_one_call_site_is_bounded_and_summarised():
    now = [0.0]
    out = Collect()
    limited = RateLimitedHandler(out, burst=5, period=60.0, clock=lambda: now[0])
    for i in range(10_000):  # an outage: the same two lines thousands of times a second
        now[0] = i * 0.002
        limited.handle(record("Unable connect to node with id %s: %s", 1, f"refused {i}"))
        limited.handle(record("Unable to update metadata from %s", [1]))
    assert len(out.records) == 10  # 5 of each in the first 60 s window (20 s of flood)
    now[0] = 61.0
    limited.handle(record("something else"))
    summaries = [r.getMessage() for r in out.records[10:]]
    assert len(summaries) == 3  # one per flooded call site, then the new record
    assert summaries[0].startswith("9995 more like this in 61 s were not logged; the last: Unable connect")
    assert "refused 9999" in summaries[0]
    assert summaries[1].startswith("9995 more like this") and summaries[2] == "something else"
    assert out.records[10].levelno == logging.ERROR


def test_rate_limit_keys_on_the_template_not_the_arguments():
    out = Collect()
    limited = RateLimitedHandler(out, burst=2, period=60.0, clock=lambda: 0.0)
    for name in ("a", "b", "c"):
        limited.handle(record("topic %r created", name, level=logging.INFO))
    limited.handle(record("different template", level=logging.INFO))
    limited.handle(record("topic %r created", "d", level=logging.WARNING))  # another level: another site
    for size in (17, 18, 19):  # a message formatted before logging (Faust's f-strings): digits do not count
        limited.handle(record(f"producer buffer full size {size}", level=logging.INFO))
    assert [r.getMessage() for r in out.records] == ["topic 'a' created", "topic 'b' created",
                                                      "different template", "topic 'd' created",
                                                      "producer buffer full size 17", "producer buffer full size 18"]


def test_json_lines_carry_level_logger_message_and_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    line = JsonFormatter().format(record("failed %d times", 3, name="streams.agents", exc_info=exc_info))
    data = json.loads(line)
    assert data["level"] == "ERROR" and data["logger"] == "streams.agents" and data["message"] == "failed 3 times"
    assert data["time"].endswith("Z") and "ValueError: boom" in data["exception"] and "\n" not in line


def test_a_clients_bad_request_is_one_info_line_without_traceback():
    from aiohttp.http_exceptions import LineTooLong

    try:
        raise LineTooLong("/" + "a" * 9000, "8190")
    except LineTooLong:
        import sys

        exc_info = sys.exc_info()
    r = record("Error handling request from %s", "127.0.0.1", name="aiohttp.server", exc_info=exc_info)
    assert ClientErrorFilter().filter(r)
    assert r.levelno == logging.INFO and r.exc_info is None
    assert r.getMessage().startswith("Error handling request from 127.0.0.1 (answered 400): Got more than 8190")
    assert len(r.getMessage()) < 300
    server_error = record("Error handling request", name="aiohttp.server", exc_info=(RuntimeError,
                          RuntimeError("bug"), None))
    ClientErrorFilter().filter(server_error)
    assert server_error.levelno == logging.ERROR and server_error.exc_info is not None  # ours stays an error


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_sets_format_and_level(fmt):
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(fmt, "WARNING", stream)
        logging.getLogger("streams.test").info("hidden")
        logging.getLogger("streams.test").warning("shown %d", 1)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    [line] = stream.getvalue().splitlines()
    if fmt == "json":
        assert json.loads(line)["message"] == "shown 1"
    else:
        assert line.endswith("[WARNING] shown 1")
