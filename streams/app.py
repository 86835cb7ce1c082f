"""The Faust app and its topics, built from WorkerSettings (an app factory: tests build many apps)."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from streams.settings import WorkerSettings


def create_app(settings: WorkerSettings, *, testing: bool = False) -> faust.App:
    """A Faust app: tables in RocksDB (memory:// when testing, which also disables the web server).

    topic_partitions is the partition count of the table changelogs; it equals the feedback topic's, since
    the history table is keyed like that topic (co-partitioned).
    """
    datadir = settings.data_dir / settings.app_id  # table files are named by table, not by app
    datadir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        store="memory://" if testing else settings.table_store,
        topic_partitions=settings.partitions,
        datadir=str(datadir),
        web_enabled=not testing,
        web_host=settings.web_host,
        web_port=settings.web_port,
        consumer_auto_offset_reset="earliest",
        producer_linger=settings.producer_linger,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=min(3.0, settings.session_timeout / 3),
        autodiscover=False,
    )


@dataclass(frozen=True)
class Topics:
    feedback: faust.TopicT
    items: faust.TopicT
    dlq: faust.TopicT
    updates: faust.TopicT
    train: faust.TopicT


def declare_topics(app: faust.App, settings: WorkerSettings) -> Topics:
    """Every topic carries raw bytes (validation is ours: streams.records). streams.topics creates them.

    The train topic is consumed without acks: Faust never commits its offsets. The worker commits the position
    a snapshot has learnt once that snapshot is latest (streams.worker.StreamWorker.commit_position)."""

    def raw(name: str, partitions: int, acks: bool = True) -> faust.TopicT:
        return app.topic(name, partitions=partitions, key_serializer="raw", value_serializer="raw", acks=acks)

    p = settings.partitions
    return Topics(
        feedback=raw(settings.feedback_topic, p),
        items=raw(settings.item_topic, p),
        dlq=raw(settings.dlq_topic, p),
        updates=raw(settings.updates_topic, 1),
        train=raw(settings.train_topic, 1, acks=False),
    )
