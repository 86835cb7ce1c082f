"""How much a worker logs while its broker is away: the lines, bytes and levels of a broker outage under load.

    SPARC_KAFKA_PORT=39392 SPARC_KAFKA_CONTROLLER_PORT=39393 SPARC_KAFKA_DIR=/tmp/kafka-x \\
        python -m benchmarks.outage_bench --broker 127.0.0.1:39392 --out runs/outage_bench.json

The broker is deploy/kafka/broker.sh's, with the SPARC_KAFKA_* environment of this process (it must be running).
One run = unique topics, consumer group, store and table directory:
  1. `sparc worker` starts in a subprocess (a small model, --log-format/--log-level given with --worker-flag);
     a thread of this process produces synthetic feedback at --rate events/s for the whole run;
  2. after --warmup seconds (the worker ingests, trains and publishes), the broker is stopped with
     `broker.sh stop --keep-data`; --outage seconds later it is started again;
  3. --after seconds later the worker's log is cut. Counted: the lines and bytes the worker wrote from the
     broker's stop to that cut, per level, and the five most frequent lines (digits masked), plus whether the
     worker took in events again after the broker came back (sparc_events_total grew).
No timing is asserted anywhere: this reports what happened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.worker_bench import free_port, http_get, parse_metrics
from sparc_stream.cli.allocator import tune_allocator

ROOT = Path(__file__).resolve().parents[1]
BROKER_SH = ROOT / "deploy" / "kafka" / "broker.sh"
SMALL_MODEL = {"SPARC_CODES": "16", "SPARC_DIM": "32", "SPARC_LAYERS": "1", "SPARC_MAX_LEN": "20"}
LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_LEVEL = re.compile(r"\b(CRITICAL|ERROR|WARNING|WARN|INFO|DEBUG)\b")


def line_level(line: str) -> str | None:
    """The level a log line states (JSON lines: their "level"; text: the first level word), None for a
    continuation line (a traceback's)."""
    if line.startswith("{"):
        try:
            return str(json.loads(line).get("level", "")).upper() or None
        except ValueError:
            pass
    found = _LEVEL.search(line[:80])
    if found is None:
        return None
    return "WARNING" if found.group(1) == "WARN" else found.group(1)


def summarise(text: str) -> dict:
    """Lines, bytes, lines per level and the most frequent lines (digits masked) of a piece of log."""
    lines = text.splitlines()
    levels: Counter = Counter()
    shapes: Counter = Counter()
    for line in lines:
        levels[line_level(line) or "continuation"] += 1
        shapes[re.sub(r"\d+", "N", line)[:160]] += 1
    return {"lines": len(lines), "bytes": len(text.encode()), "levels": dict(levels),
            "top_lines": [{"count": n, "line": s} for s, n in shapes.most_common(5)]}


def broker(command: str, *args: str, tries: int = 1) -> int:
    """Run broker.sh; returns the tries it took. A start is tried again when the port was taken: on loopback, a
    client reconnecting in a tight loop to the stopped broker's port can connect to itself (TCP simultaneous
    open from an ephemeral port equal to the port) and hold that port for a moment."""
    for attempt in range(1, tries + 1):
        done = subprocess.run(["bash", str(BROKER_SH), command, *args], capture_output=True, text=True,
                              check=False)
        if done.returncode == 0:
            return attempt
        if attempt == tries or "Address already in use" not in done.stderr + _broker_stdout_log():
            raise SystemExit(f"broker.sh {command} failed:\n{done.stderr[-2000:]}")
        time.sleep(1)
    return tries


def _broker_stdout_log() -> str:
    state = Path(os.environ.get("SPARC_KAFKA_DIR", Path.home() / ".cache/sparc-stream/kafka-run"))
    try:
        return (state / "logs" / "server.log").read_text(errors="replace")[-20000:]
    except OSError:
        return ""


def produce_forever(bootstrap: str, topic: str, rate: float, stop: threading.Event, sent: list[int]) -> None:
    """Synthetic feedback at `rate` events/s until `stop`; sends that fail during the outage are dropped."""
    from kafka import KafkaProducer

    from sparc_stream.cli.produce import Pacer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks=1, max_block_ms=1000,
                             reconnect_backoff_max_ms=1000)
    pacer, n = Pacer(rate), 0
    try:
        while not stop.is_set():
            n += 1
            event = {"event_id": f"o-{n}", "user_id": n % 500, "item_id": 1 + n % 800,
                     "timestamp": int(time.time()), "event_type": "view"}
            try:
                producer.send(topic, key=str(n % 500).encode(), value=json.dumps(event).encode())
                sent[0] += 1
            except Exception:  # broker away: the buffer is full or metadata is missing
                pass
            pacer.wait(n)
    finally:
        with contextlib.suppress(Exception):  # records still buffered when the run ends are dropped
            producer.close(timeout=2)


def events_total(port: int) -> float | None:
    status, body = http_get(port, "/metrics")
    return parse_metrics(body.decode()).get("sparc_events_total") if status == 200 else None


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", required=True, help="the broker.sh broker's bootstrap address")
    p.add_argument("--rate", type=float, default=400.0, help="feedback events per second (default 400)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the outage (default 20)")
    p.add_argument("--outage", type=float, default=20.0, help="seconds the broker is away (default 20)")
    p.add_argument("--after", type=float, default=20.0,
                   help="seconds counted after the broker is back (default 20)")
    p.add_argument("--worker-flag", action="append", default=[], metavar="FLAG",
                   help="extra `sparc worker` flag, e.g. --worker-flag=--log-format=json (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    run = uuid.uuid4().hex[:8]
    topic = f"outage-feedback-{run}"
    workdir = Path(tempfile.mkdtemp(prefix="outage-bench-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARC_") or k.startswith("SPARC_KAFKA_")}
    env.update(SMALL_MODEL)
    flags = ["--broker", args.broker, "--store", f"file://{workdir}/store", "--data-dir", str(workdir / "faust"),
             "--app-id", f"outage-{run}", "--partitions", "2", "--web-port", str(port),
             "--snapshot-every-seconds", "5", *args.worker_flag]
    env["SPARC_FEEDBACK_TOPIC"], env["SPARC_ITEM_TOPIC"] = topic, f"outage-items-{run}"
    env["SPARC_UPDATES_TOPIC"], env["SPARC_DLQ_TOPIC"] = f"outage-updates-{run}", f"outage-dlq-{run}"
    log = workdir / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "sparc_stream.cli.main", "worker", *flags], env=env, cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT)
    stop, sent = threading.Event(), [0]
    producer = threading.Thread(target=produce_forever, args=(args.broker, topic, args.rate, stop, sent),
                                daemon=True)
    result: dict = {"rate": args.rate, "outage_s": args.outage, "after_s": args.after,
                    "worker_flags": args.worker_flag, "log": str(log)}
    try:
        deadline = time.monotonic() + 180
        while events_total(port) is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not come up; its log: {log}")
            time.sleep(0.5)
        producer.start()
        time.sleep(args.warmup)
        before = events_total(port)
        cut = log.stat().st_size
        broker("stop", "--keep-data")
        time.sleep(args.outage)
        result["broker_start_tries"] = broker("start", tries=10)
        time.sleep(args.after)
        after = events_total(port)
        text = log.read_bytes()[cut:].decode(errors="replace")
        result.update(summarise(text))
        result["events_before_outage"], result["events_after"] = before, after
        result["recovered"] = bool(after is not None and before is not None and after > before)
        result["worker_alive"] = worker.poll() is None
        result["sent"] = sent[0]
    finally:
        stop.set()
        producer.join(timeout=10) if producer.is_alive() else None
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
    print(f"outage of {args.outage:.0f} s: {result.get('lines')} lines, {result.get('bytes')} bytes, "
          f"levels {result.get('levels')}, recovered={result.get('recovered')}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
