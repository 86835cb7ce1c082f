"""Create the worker's topics as an operator sets them, before Faust starts; warn about existing ones that differ.

Faust creates only its internal topics (the table changelog, compacted, with the worker's replication factor and
min.insync.replicas: streams.app, `changelog_configs`). The worker's own topics (`topic_specs`):

  topic                  partitions         cleanup.policy   retention.ms
  feedback-events        partitions         delete           events_retention_ms
  item-events            partitions         compact          - (the latest event of every item is kept: the catalogue)
  feedback-dlq           partitions         delete           dlq_retention_ms
  codebook-updates       1                  delete           updates_retention_ms (new subscribers read it all)
  <app>-train-examples   train_partitions   delete           train_retention_ms
  <app>-feedback-by-user partitions         delete           events_retention_ms (records re-keyed by user)

each with replication_factor replicas (None: the cluster's default.replication.factor, read from a broker) and
min.insync.replicas when set. The feedback and repartition topics must have exactly `settings.partitions`
partitions (a table and the topics it is keyed by are co-partitioned), the train topic `train_partitions` (one
user's examples in one partition, in order) and codebook-updates one (versions are ordered): another count is a
`TopicError` the operator must fix. Other differences (replicas,
cleanup, retention, min.insync.replicas) of a topic that already exists are named in one warning per topic; the
worker runs with them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streams.kafka_connection import KafkaConfigError
from streams.settings import WorkerSettings

log = logging.getLogger(__name__)


class TopicError(Exception):
    """A topic cannot be created or inspected, or has a partition count the worker cannot run with."""


@dataclass(frozen=True)
class TopicSpec:
    partitions: int
    configs: dict[str, str]


def changelog_configs(settings: WorkerSettings) -> dict[str, str]:
    """Topic configs of the table changelogs beyond Faust's own (cleanup.policy=compact)."""
    if settings.min_insync_replicas is None:
        return {}
    return {"min.insync.replicas": str(settings.min_insync_replicas)}


def topic_specs(settings: WorkerSettings) -> dict[str, TopicSpec]:
    """Topic name -> what the worker creates it with (the module doc's table)."""
    common = changelog_configs(settings)

    def deleting(retention_ms: int) -> dict[str, str]:
        return {"cleanup.policy": "delete", "retention.ms": str(retention_ms), **common}

    p = settings.partitions
    return {
        settings.feedback_topic: TopicSpec(p, deleting(settings.events_retention_ms)),
        settings.item_topic: TopicSpec(p, {"cleanup.policy": "compact", **common}),
        settings.dlq_topic: TopicSpec(p, deleting(settings.dlq_retention_ms)),
        settings.updates_topic: TopicSpec(1, deleting(settings.updates_retention_ms)),
        settings.train_topic: TopicSpec(settings.train_topic_partitions, deleting(settings.train_retention_ms)),
        settings.repartition_topic: TopicSpec(p, deleting(settings.events_retention_ms)),
    }


def required_topics(settings: WorkerSettings) -> dict[str, int]:
    """Topic name -> partitions the worker needs."""
    return {name: spec.partitions for name, spec in topic_specs(settings).items()}


def admin_client(settings: WorkerSettings, timeout_s: float = 30.0) -> KafkaAdminClient:
    return KafkaAdminClient(
        **settings.kafka_connection().kafka_python(),
        client_id=f"{settings.app_id}-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )


def ensure_topics(
    settings: WorkerSettings, names: list[str] | None = None, *, check: bool = True, timeout_s: float = 30.0
) -> int:
    """Create missing topics (every required one, or those in `names`); with `check`, also make sure the
    existing ones have the partitions the worker needs (a producer only needs them to exist) and warn about
    their other differences. Returns the replication factor used (settings.replication_factor, or the cluster's
    default when that is None): the worker gives it to Faust for the changelogs."""
    wanted = topic_specs(settings)
    if names is not None:
        wanted = {n: wanted[n] for n in names}
    try:
        settings.kafka_connection().check(timeout_s)  # a refused login or certificate: the broker's reason
        admin = admin_client(settings, timeout_s)
    except KafkaConfigError as exc:
        raise TopicError(str(exc)) from None
    except KafkaError as exc:
        raise TopicError(f"cannot connect to Kafka at {settings.kafka_connection().describe()}: {exc}") from None
    try:
        replication = settings.replication_factor or default_replication_factor(admin)
        existing = set(admin.list_topics())
        missing = {
            n: {"num_partitions": spec.partitions, "replication_factor": replication, "configs": spec.configs}
            for n, spec in wanted.items() if n not in existing
        }
        if missing:
            # another process may create one meanwhile: fine, its partitions are checked below
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing, timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
        if check:
            check_partitions(admin, wanted)
            present = {n: spec for n, spec in wanted.items() if n in existing}  # created just now: as wanted
            if settings.changelog_topic in existing:
                present[settings.changelog_topic] = TopicSpec(
                    settings.partitions, {"cleanup.policy": "compact", **changelog_configs(settings)}
                )
            for name, differences in topic_differences(admin, present, replication).items():
                log.warning("topic %r differs from the worker's settings: %s (the worker runs with it as it is; "
                            "alter it with kafka-configs, or use new topic names)", name, "; ".join(differences))
    except KafkaError as exc:
        raise TopicError(f"cannot create or inspect topics on {settings.kafka_connection().describe()}: "
                         f"{exc}") from None
    finally:
        admin.close()
    return replication


def default_replication_factor(admin: KafkaAdminClient) -> int:
    """The default.replication.factor of a broker of the cluster (the controller's, or the first's)."""
    cluster = admin.describe_cluster()
    broker = str(cluster.get("controller_id") if cluster.get("controller_id", -1) >= 0
                 else cluster["brokers"][0]["broker_id"])
    resource = ConfigResource(ConfigResourceType.BROKER, broker, {"default.replication.factor": None})
    configs = admin.describe_configs([resource], config_filter="all")
    try:
        return int(configs["broker"][broker]["default.replication.factor"]["value"])
    except (KeyError, TypeError, ValueError):
        raise TopicError(f"broker {broker} does not say its default.replication.factor (not allowed to describe "
                         "its configs?): set replication_factor") from None


def check_partitions(admin: KafkaAdminClient, wanted: dict[str, TopicSpec]) -> None:
    for topic in admin.describe_topics(list(wanted)):
        name, count = topic["name"], len(topic["partitions"])
        if count != wanted[name].partitions:
            raise TopicError(
                f"topic {name!r} has {count} partitions, the worker needs {wanted[name].partitions} "
                "(set SPARC_PARTITIONS / --partitions to match, or use new topic names)"
            )


def topic_differences(admin: KafkaAdminClient, specs: dict[str, TopicSpec], replication: int) -> dict[str, list[str]]:
    """Existing topic -> how its replicas and configs differ from `specs` (topics that match are left out)."""
    if not specs:
        return {}
    replicas = {t["name"]: len(t["partitions"][0]["replica_nodes"]) for t in admin.describe_topics(list(specs))
                if t["partitions"]}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, dict.fromkeys(spec.configs)) for name, spec in
                 specs.items()]
    configs = admin.describe_configs(resources, config_filter="all").get("topic", {})
    out: dict[str, list[str]] = {}
    for name, spec in specs.items():
        differences = []
        if name in replicas and replicas[name] != replication:
            differences.append(f"replicas {replicas[name]}, the worker's {replication}")
        for key, want in spec.configs.items():
            have = configs.get(name, {}).get(key, {}).get("value")
            if have != want:
                differences.append(f"{key}={have}, the worker's {want}")
        if differences:
            out[name] = differences
    return out
