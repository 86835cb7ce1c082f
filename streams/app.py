"""The Faust app and its topics, built from WorkerSettings (an app factory: tests build many apps)."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from streams.settings import WorkerSettings


def create_app(settings: WorkerSettings, *, testing: bool = False) -> faust.App:
    """A Faust app: tables in RocksDB (memory:// when testing, which also disables the web server).

    Every Faust setting comes from `settings`: `env={}` keeps Faust from reading its own unprefixed environment
    variables (WEB_PORT, BROKER_URL, TOPIC_PARTITIONS, ...), which would otherwise override what is passed here
    (Kubernetes sets WEB_PORT=tcp://... for a Service named `web`). The web server binds web_host.
    topic_partitions is the partition count of the table changelogs; it equals the feedback topic's, since
    the history table is keyed like that topic (co-partitioned); their replication is the worker's
    (replication_factor, resolved to the cluster's default by streams.topics.ensure_topics). With
    group_instance_id the process is a static member of the group (a restart under the same id keeps its
    partitions, no rebalance); table_standby_replicas other processes keep the table's partitions warm.
    """
    datadir = settings.data_dir / settings.app_id  # table files are named by table, not by app
    datadir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = faust.App(
        settings.app_id,
        env={},
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=settings.kafka_connection().faust_credentials(),
        store="memory://" if testing else settings.table_store,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor or 1,
        datadir=str(datadir),
        web_enabled=not testing,
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        consumer_auto_offset_reset="earliest",
        producer_linger=settings.producer_linger,
        consumer_max_fetch_size=settings.fetch_bytes,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=min(3.0, settings.session_timeout / 3),
        consumer_group_instance_id=settings.group_instance_id,
        table_standby_replicas=settings.table_standby_replicas,
        autodiscover=False,
    )
    # Table writes wait in Faust's producer buffer until sent; above max_messages (100) every message delivery
    # waits until 100 more are sent, one wait_for each. Ingest writes up to batch_size values (one changelog
    # message each) at the end of a micro-batch, so the limit is raised to keep a batch's writes from stalling
    # the next batch's deliveries; the buffer stays bounded by it.
    buffer = app.producer.buffer
    buffer.max_messages = max(buffer.max_messages, 2 * settings.batch_size)
    return app


@dataclass(frozen=True)
class Topics:
    feedback: faust.TopicT  # the ingest agent's source: feedback-events and the repartition topic
    repartition: faust.TopicT
    dlq: faust.TopicT
    train: faust.TopicT


def declare_topics(app: faust.App, settings: WorkerSettings) -> Topics:
    """The topics Faust reads or writes; every one carries raw bytes (validation is ours: streams.records).
    streams.topics creates them. The ingest agent reads feedback-events and the repartition topic (records
    re-keyed by user) as one stream: both have `partitions` partitions, as the history table, so Faust assigns
    partition p of all three to one process (co-partitioning). The train topic, item-events and codebook-updates
    are the learner's (streams.learning), which reads them by assignment, not through Faust."""

    def raw(*names: str, partitions: int) -> faust.TopicT:
        return app.topic(*names, partitions=partitions, key_serializer="raw", value_serializer="raw")

    p = settings.partitions
    return Topics(
        feedback=raw(settings.feedback_topic, settings.repartition_topic, partitions=p),
        repartition=raw(settings.repartition_topic, partitions=p),
        dlq=raw(settings.dlq_topic, partitions=p),
        train=raw(settings.train_topic, partitions=settings.train_topic_partitions),
    )
