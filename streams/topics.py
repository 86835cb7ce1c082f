"""Create the worker's topics with the partition counts it needs, before Faust starts.

Faust creates only its internal topics (table changelogs). The source topics must exist with exactly
`settings.partitions` partitions (a table and the topic it is keyed by are co-partitioned), and
codebook-updates / the train topic with one (versions and training examples are ordered). A topic that already
exists with another partition count is an error the operator must fix, named in `TopicError`.
"""

from __future__ import annotations

import contextlib

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streams.settings import WorkerSettings


class TopicError(Exception):
    """A topic cannot be created or inspected, or has a partition count the worker cannot run with."""


def required_topics(settings: WorkerSettings) -> dict[str, int]:
    """Topic name -> partitions the worker needs."""
    p = settings.partitions
    return {
        settings.feedback_topic: p,
        settings.item_topic: p,
        settings.dlq_topic: p,
        settings.updates_topic: 1,
        settings.train_topic: 1,
    }


def ensure_topics(
    settings: WorkerSettings, names: list[str] | None = None, *, check: bool = True, timeout_s: float = 30.0
) -> None:
    """Create missing topics (every required one, or those in `names`); with `check`, also make sure the
    existing ones have the partitions the worker needs (a producer only needs them to exist)."""
    wanted = required_topics(settings)
    if names is not None:
        wanted = {n: wanted[n] for n in names}
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.app_id}-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        existing = set(admin.list_topics())
        missing = {n: {"num_partitions": c} for n, c in wanted.items() if n not in existing}
        if missing:
            # another process may create one meanwhile: fine, its partitions are checked below
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing, timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
        for topic in admin.describe_topics(list(wanted)) if check else ():
            name, count = topic["name"], len(topic["partitions"])
            if count != wanted[name]:
                raise TopicError(
                    f"topic {name!r} has {count} partitions, the worker needs {wanted[name]} "
                    "(set SPARC_PARTITIONS / --partitions to match, or use new topic names)"
                )
    except KafkaError as exc:
        raise TopicError(f"cannot create or inspect topics on {settings.broker}: {exc}") from exc
    finally:
        admin.close()
