"""The reader of the learner's processed log (`processed_log`, written by streams.learning): which event ids a
snapshot has learnt. Tests and benchmarks use it to prove that nothing was lost (at least once).

    lines = read_processed_log(path)
    learnt = learnt_event_ids(lines, train_positions(latest["watermark"]["kafka"], app_id))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


def read_processed_log(path: Path) -> list[dict]:
    """One dict per complete line (a crash may cut the last one)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def learnt_event_ids(lines: list[dict], upto: Mapping[str, int]) -> list[str]:
    """The event ids a snapshot whose watermark is `upto` ({"topic:partition": next offset}, its train
    partitions' at least) has learnt, from the learner's processed log.

    A start line resumes from a snapshot that has learnt the train messages below its resume positions: the
    steps logged before that start that read at or above them were learnt by a model that no snapshot kept, and
    are learnt again after it. So the lineage is: every step, minus those a later start discarded, whose every
    read span ends at or below `upto`. The list keeps repeats (an event trained twice, at least once is the
    contract). Lines of several data-parallel ranks: give each rank's lines (its own log) and join the lists."""
    kept: list[tuple[dict, list[str]]] = []
    for line in lines:
        if "start" in line:
            resume = line["start"]["resume"]
            kept = [(read, ids) for read, ids in kept
                    if all(first < resume.get(key, 0) for key, (first, _) in read.items())]
        elif "read" in line:
            kept.append((line["read"], line["event_ids"]))
    return [event_id for read, ids in kept if all(end <= upto.get(key, 0) for key, (_, end) in read.items())
            for event_id in ids]


def train_positions(watermark: Mapping[str, int], app_id: str) -> dict[str, int]:
    """The train-topic entries of a snapshot's watermark."""
    return {key: offset for key, offset in watermark.items() if key.startswith(f"{app_id}-train-examples:")}
