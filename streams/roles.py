"""The processes of the scale-out roles that are not Faust apps: `sparc learn` (LearnNode) and `sparc serve`
(ServeNode). `sparc ingest` and `sparc worker` are streams.worker.StreamWorker. README, "Running at scale", has
the topology.

    sys.exit(run_node(LearnNode(settings), settings))

Each node has a few threads (the learner's loop; a serve replica's store follower and history copy) and answers
HTTP (streams.views) on the main thread's event loop until SIGTERM/SIGINT, or until one of its threads ends
(a fenced learner, a failure): then every thread is told to stop, and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from streams.learn_loop import LearnLoop
from streams.learning import Learning, RoleFailed
from streams.metrics import RecoveryMetrics, WorkerMetrics
from streams.outputs import KafkaLearnOutputs
from streams.serving import ChangelogHistory, Serving, StoreFollower
from streams.settings import WorkerSettings
from streams.views import aiohttp_app

log = logging.getLogger(__name__)

Work = Callable[[threading.Event], None]


def apply_process_settings(settings: WorkerSettings) -> None:
    """The settings that hold for the whole process, so set only by a process that runs a worker or a role:
    torch's intra-op threads and the GIL switch interval (WorkerSettings.switch_interval says why). Without it
    torch takes a thread per core, and on a small machine the learner's second one (OpenMP, spinning between
    ops) takes the core that ingest and the broker need."""
    torch.set_num_threads(settings.torch_threads)
    sys.setswitchinterval(settings.switch_interval)


def learn_outputs(settings: WorkerSettings) -> KafkaLearnOutputs:
    """The learner's producer: dead letters and codebook-updates, in order, acknowledged by every in-sync
    replica."""
    from kafka import KafkaProducer

    from codebook_store.messages import DEFAULT_MAX_BYTES

    producer = KafkaProducer(**settings.kafka_connection().kafka_python(), client_id=f"{settings.app_id}-learn",
                             acks="all", linger_ms=5, max_in_flight_requests_per_connection=1,
                             max_request_size=max(1 << 20, DEFAULT_MAX_BYTES + (64 << 10)))
    return KafkaLearnOutputs(producer, settings.dlq_topic, settings.updates_topic)


class LearnNode:
    """`sparc learn`: the learner (one rank of it) and its probes."""

    serving = None

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        apply_process_settings(settings)  # one torch thread by default: a second spins on the core ingest needs
        self.metrics = WorkerMetrics(settings.levels)
        self.recovery = RecoveryMetrics(self.metrics.registry)
        if settings.world_size > 1:
            from trainer.distributed import init_group

            init_group(settings.rank, settings.world_size, settings.dist_url)
        self.outputs = learn_outputs(settings)
        try:
            self.learning = Learning(settings, self.outputs, metrics=self.metrics, recovery=self.recovery)
        except BaseException:
            self.outputs.close()
            raise
        self.loop = LearnLoop(self.learning, settings)
        self.metrics.lag_source(lambda: dict(self.loop.lag))

    def run(self) -> int:
        return run_node(self, self.settings)

    def work(self) -> dict[str, Work]:
        return {"sparc-learner": self.loop.run}

    def user_history(self, user_id: str) -> list:
        return []

    def latest_manifest(self) -> dict | None:
        return self.learning.publisher.latest()

    def problems(self) -> list[str]:
        failure = self.failure()
        return [] if failure is None else [failure]

    def failure(self) -> str | None:
        if self.learning.fenced:
            return f"fenced: {self.learning.fenced}"
        if self.loop.error is not None:
            return f"the learner stopped: {self.loop.error!r}"
        return None

    def close(self) -> None:
        self.learning.close()
        self.outputs.close()
        if self.settings.world_size > 1:
            import torch.distributed as dist

            from trainer.distributed import leave_group

            if self.failure() is None:
                leave_group()  # a barrier: no rank tears the group down while another still uses it
            else:  # another rank may be gone: no barrier that would wait for it
                dist.destroy_process_group()

    def started(self) -> None:
        log.info("%s", self.learning.start.message)
        for warning in self.learning.start.warnings:
            log.warning("%s", warning)


class ServeNode:
    """`sparc serve`: one serving replica (the store's latest snapshot, a copy of the history table)."""

    learning = None

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        apply_process_settings(settings)
        self.metrics = WorkerMetrics(settings.levels)
        self.serving = Serving(settings, self.metrics)
        self.follower = StoreFollower(settings, self.serving)
        directory = settings.data_dir / f"{settings.app_id}-serve-{settings.web_port}" / "history"
        self.histories = ChangelogHistory(settings, directory)
        self._errors: dict[str, BaseException] = {}

    def run(self) -> int:
        return run_node(self, self.settings)

    def work(self) -> dict[str, Work]:
        return {"sparc-follower": self.follower.run, "sparc-history": self.histories.run}

    def user_history(self, user_id: str) -> list:
        return self.histories.items(user_id)

    def latest_manifest(self) -> dict | None:
        store = self.follower.open()
        if store is None:
            return None
        version = store.latest_version(model=self.settings.model_name)
        return None if version is None else store.manifest(version, model=self.settings.model_name).as_dict()

    def problems(self) -> list[str]:
        reasons = [] if self.serving.index.current is not None else ["no snapshot is served yet"]
        if not self.histories.caught_up.is_set():
            reasons.append("the history copy is catching up with the changelog")
        return reasons

    def failure(self) -> str | None:
        return None

    def close(self) -> None:
        pass

    def started(self) -> None:
        log.info("serving %s from %s; histories from %s", self.settings.model_name, self.settings.store_url,
                 self.settings.changelog_topic)


def run_node(node: Any, settings: WorkerSettings) -> int:
    """Run the node's threads and its HTTP endpoints until SIGTERM/SIGINT or until a thread ends; returns 0.
    Raises RoleFailed (one line) when a thread ended with a failure (a fenced learner: its reason)."""
    stop = threading.Event()
    failed: list[str] = []

    def guarded(name: str, work: Work) -> Callable[[], None]:
        def run() -> None:
            try:
                work(stop)
            except BaseException as exc:
                log.exception("%s failed", name)
                failed.append(f"{name}: {exc!r}")
            finally:
                stop.set()  # one part ends: the process ends

        return run

    threads = [threading.Thread(target=guarded(name, work), name=name, daemon=True)
               for name, work in node.work().items()]

    async def main() -> None:
        from aiohttp import web

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(aiohttp_app(node), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.web_host, settings.web_port).start()
        node.started()
        for thread in threads:
            thread.start()
        await loop.run_in_executor(None, stop.wait)
        for thread in threads:
            await loop.run_in_executor(None, thread.join)
        await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        # asyncio gave SIGTERM/SIGINT their default action back: one more while the node closes (a data-parallel
        # rank waits in a barrier for the others to stop too) must not kill it half-way through
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        node.close()
    failure = node.failure() or (failed[0] if failed else None)
    if failure is not None:
        raise RoleFailed(failure)
    return 0
