"""Which partition holds a user: the rule that keeps one user's history in one place across the roles.

    home_partition("u42", 4)        # feedback / repartition topic and history-table partition of user "u42"
    train_partition(home, 8)        # the train-topic partition of that user's examples

A user's home is murmur2 of the user id's UTF-8 bytes modulo the partition count: the default partitioner of
the Java client, kafka-python, aiokafka (and so Faust) and `sparc produce` when the key is the user id. A
feedback record read from another partition (a null key, another user's key, a producer with another
partitioner) would split its user's history between two table partitions; ingest re-keys it to its home
through the repartition topic instead (or dead-letters it: settings.on_wrong_key). librdkafka's default
partitioner (consistent_random, CRC32) differs: producers built on it should set partitioner=murmur2_random.

A user's train partition is a function of the home partition only, so every example of a user goes to one
train partition, in the order ingest forwards them, whichever ingest process holds the home partition.
"""

from __future__ import annotations

from kafka.partitioner.default import murmur2


def home_partition(user_id: str, partitions: int) -> int:
    """The partition a record keyed by `user_id` lands in under the default (murmur2) partitioner."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def train_partition(home: int, train_partitions: int) -> int:
    """The train-topic partition of the examples of users whose home partition is `home`."""
    return home % train_partitions
