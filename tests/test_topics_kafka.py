"""Topics as an operator sets them (streams.topics), against the real broker: replication factor (the cluster's
default when unset), min.insync.replicas, retention and cleanup on every topic the worker creates, and a warning
that names an existing topic whose settings differ."""

from __future__ import annotations

import logging
import uuid

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from streams.settings import DAY_MS, WorkerSettings
from streams.topics import ensure_topics, topic_specs

pytestmark = pytest.mark.kafka


def settings_for(bootstrap: str, run: str, **over) -> WorkerSettings:
    return WorkerSettings(broker=bootstrap, app_id=f"topics-{run}", partitions=2, feedback_topic=f"fb-{run}",
                          item_topic=f"items-{run}", dlq_topic=f"dlq-{run}", updates_topic=f"updates-{run}", **over)


def described(admin: KafkaAdminClient, names) -> dict[str, dict[str, str]]:
    resources = [ConfigResource(ConfigResourceType.TOPIC, n, {"cleanup.policy": None, "retention.ms": None,
                                                              "min.insync.replicas": None}) for n in names]
    found = admin.describe_configs(resources, config_filter="all")["topic"]
    return {name: {key: entry["value"] for key, entry in configs.items()} for name, configs in found.items()}


def test_every_topic_is_created_with_replicas_retention_cleanup_and_min_insync(kafka_bootstrap, caplog):
    run = uuid.uuid4().hex[:8]
    settings = settings_for(kafka_bootstrap, run, min_insync_replicas=1, updates_retention_ms=30 * DAY_MS)
    with caplog.at_level(logging.WARNING, logger="streams.topics"):
        assert ensure_topics(settings) == 1  # replication_factor unset: the broker's default (1 here)
    assert not caplog.records  # created as wanted: nothing to warn about
    names = list(topic_specs(settings))
    with KafkaAdminClient(bootstrap_servers=kafka_bootstrap) as admin:
        try:
            configs = described(admin, names)
            replicas = {t["name"]: len(t["partitions"][0]["replica_nodes"]) for t in admin.describe_topics(names)}
        finally:
            admin.delete_topics(names, raise_errors=False)
    assert set(replicas.values()) == {1}
    assert configs[settings.feedback_topic] == {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS),
                                                "min.insync.replicas": "1"}
    assert configs[settings.item_topic]["cleanup.policy"] == "compact"
    assert configs[settings.updates_topic]["retention.ms"] == str(30 * DAY_MS)
    assert configs[settings.dlq_topic]["retention.ms"] == str(14 * DAY_MS)
    assert configs[settings.train_topic]["cleanup.policy"] == "delete"


def test_an_existing_topic_that_differs_is_named_in_a_warning(kafka_bootstrap, caplog):
    run = uuid.uuid4().hex[:8]
    settings = settings_for(kafka_bootstrap, run)
    with KafkaAdminClient(bootstrap_servers=kafka_bootstrap) as admin:
        admin.create_topics({settings.feedback_topic: {"num_partitions": 2, "replication_factor": 1,
                                                       "configs": {"retention.ms": "3600000"}},
                             settings.changelog_topic: {"num_partitions": 2, "replication_factor": 1,
                                                        "configs": {"cleanup.policy": "delete"}}},
                            wait_for_metadata=True)
        try:
            with caplog.at_level(logging.WARNING, logger="streams.topics"):
                ensure_topics(settings)
        finally:
            admin.delete_topics([*topic_specs(settings), settings.changelog_topic], raise_errors=False)
    warnings = {r.args[0]: r.getMessage() for r in caplog.records}
    assert set(warnings) == {settings.feedback_topic, settings.changelog_topic}
    assert f"retention.ms=3600000, the worker's {7 * DAY_MS}" in warnings[settings.feedback_topic]
    assert "cleanup.policy=delete, the worker's compact" in warnings[settings.changelog_topic]


def test_an_explicit_replication_factor_the_cluster_cannot_meet_is_one_clear_error(kafka_bootstrap):
    from streams.topics import TopicError

    settings = settings_for(kafka_bootstrap, uuid.uuid4().hex[:8], replication_factor=3)
    with pytest.raises(TopicError, match="cannot create or inspect topics.*[Rr]eplication"):
        ensure_topics(settings)
