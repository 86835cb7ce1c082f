"""One worker process: the Faust app, its topics and history table, the online learner, the snapshot
publisher, the serving index and the metrics, wired together (agents.py and views.py hold the per-event and
per-request logic).

    w = StreamWorker(WorkerSettings(broker="127.0.0.1:39092"))
    w.run()                        # blocks until SIGINT/SIGTERM; returns the exit status
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import torch

from streams import agents, views
from streams.app import create_app, declare_topics
from streams.batching import LearnerInput, merge_watermarks
from streams.index import IndexHolder
from streams.metrics import WorkerMetrics
from streams.outputs import KafkaOutputs, Outputs
from streams.publisher import Publisher
from streams.settings import WorkerSettings
from trainer.online import LearnerState, OnlineLearner


class StreamWorker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        testing: bool = False,
        outputs: Outputs | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings, self.clock = settings, clock
        self.app = create_app(settings, testing=testing)
        self.topics = declare_topics(self.app, settings)
        self.history = self.app.Table(
            "user-history",
            default=None,
            partitions=settings.partitions,
            help="per user: last items and recent event ids (streams.history)",
        )
        self.learner = OnlineLearner(settings.sparc_config(), settings.train_config())
        self.publisher = Publisher(settings.store_url, settings.model_name, settings.min_utilisation)
        self.index = IndexHolder()
        self.metrics = WorkerMetrics(settings.levels, clock)
        self.outputs = outputs or KafkaOutputs(self.topics.dlq, self.topics.train, self.topics.updates)
        self.watermark: dict[str, int] = {}  # input the learner has trained on; written in the learner thread
        self.last_gate: list[str] = []  # reasons the last snapshot was held back (empty: it passed)
        self.publish_lock = asyncio.Lock()
        self._published = (0, clock())  # (steps, time) of the last snapshot capture
        self._learner_pool = ThreadPoolExecutor(1, thread_name_prefix="sparc-learner")
        self._publisher_pool = ThreadPoolExecutor(1, thread_name_prefix="sparc-publisher")
        self.agents = agents.register(self)
        views.register(self)

    # --- the learner thread: everything that reads or changes the model
    async def in_learner(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._learner_pool, fn, *args)

    async def in_publisher(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._publisher_pool, fn, *args)

    def learn(self, inp: LearnerInput) -> dict:
        metrics = self.learner.learn(inp.events, inp.histories)
        watermark = dict(self.watermark)
        merge_watermarks(watermark, inp.watermark)
        self.watermark = watermark  # swapped whole: readers on the event loop never see it half-updated
        return metrics

    def capture(self) -> tuple[LearnerState, dict, dict[str, int]]:
        return self.learner.snapshot_state(), self.learner.health(), dict(self.watermark)

    # --- publishing schedule
    def publish_due(self) -> bool:
        steps, at = self._published
        new_steps = self.learner.steps - steps
        s = self.settings
        return new_steps >= s.snapshot_every_steps or (
            new_steps > 0 and self.clock() - at >= s.snapshot_every_seconds
        )

    def mark_published(self, steps: int, at: float) -> None:
        self._published = (steps, at)

    # --- lifecycle
    def run(self) -> int:
        """Run the Faust worker in this process until it is stopped; returns its exit status."""
        torch.set_num_threads(self.settings.torch_threads)  # process-wide, so only here
        worker = faust.Worker(self.app, loglevel="INFO")
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self._learner_pool.shutdown(wait=True)
        self._publisher_pool.shutdown(wait=True)
        self.publisher.close()
