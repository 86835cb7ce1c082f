"""The worker's settings: connections, topic names, batching, publishing and the model's shape.

This is the only module of the worker that reads the environment. Every field can be set as `SPARC_<FIELD>`
(e.g. SPARC_BROKER=127.0.0.1:39092, SPARC_BATCH_SIZE=128) or passed to `WorkerSettings(...)` directly
(keyword arguments win over the environment). The model hyperparameters become a SparcConfig/TrainConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.config import ONLINE_TRAINING, EncoderConfig, SparcConfig, TrainConfig


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARC_", frozen=True, extra="forbid")

    # --- connections and names
    broker: str = Field("127.0.0.1:39092", description="Kafka bootstrap servers, host:port[,host:port]")
    app_id: str = Field(
        "sparc-worker", description="Faust app id = Kafka consumer group; prefixes internal topics"
    )
    feedback_topic: str = "feedback-events"
    item_topic: str = "item-events"
    updates_topic: str = "codebook-updates"
    dlq_topic: str = "feedback-dlq"
    partitions: int = Field(
        4, ge=1, description="partitions of the feedback/item/DLQ topics and of the tables"
    )
    store_url: str = Field(
        "rocksdb://./state/snapshots", description="codebook store (codebook_store.open_store)"
    )
    model_name: str = "sparc"
    data_dir: Path = Field(Path("./state/faust"), description="Faust's table state (RocksDB) lives here")
    table_store: str = Field("rocksdb://", description="Faust table store; memory:// only for tests")
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535)
    session_timeout: float = Field(
        60.0,
        ge=6.0,
        description="seconds a silent (crashed) worker keeps its partitions before the group moves on; "
        "the broker's group.min.session.timeout.ms (6 s by default) is the floor",
    )

    # --- ingest
    max_event_bytes: int = Field(16_384, ge=64, description="larger messages go to the DLQ unread")
    max_item_id: int = Field(
        1_000_000, ge=1, description="item ids above this are rejected (the table grows)"
    )
    dedup_window: int = Field(256, ge=1, description="recent event ids remembered per user")

    # --- training and publishing
    batch_size: int = Field(
        64, ge=1, description="micro-batch: feedback messages the ingest agent forwards as one train message (a step)"
    )
    batch_seconds: float = Field(1.0, gt=0, description="a smaller micro-batch is forwarded after this long")
    train_message_bytes: int = Field(
        900_000,
        ge=1024,
        description="a micro-batch whose train message would be larger is sent (and learnt) in parts; Kafka's "
        "message size limits (about 1 MB by default, the producer's and the broker's) must allow this much",
    )
    fetch_bytes: int = Field(
        262_144,
        ge=1024,
        description="bytes the consumer fetches per partition at a time (Faust's consumer_max_fetch_size). Faust "
        "hands a fetch's records to the agents before it fetches again, so with a feedback backlog a large fetch "
        "(1 MiB: ~7,000 events per partition) delays the train and item messages behind it and the learner idles "
        "while the backlog is ingested; a larger message (a train message) is still fetched whole",
    )
    producer_linger: float = Field(
        0.005,
        ge=0,
        description="seconds Faust's producer waits to fill a request (fewer, larger sends: less event-loop CPU "
        "per message, at most this much later)",
    )
    snapshot_every_steps: int = Field(200, ge=1)
    snapshot_every_seconds: float = Field(
        60.0, gt=0, description="publish after this long if steps were taken"
    )
    full_codes_every: int = Field(
        10, ge=1, description="every N-th codebook update carries the whole item -> code table (the others a remap "
        "from the previous one): where a subscriber that missed a version, or joins late, catches up",
    )
    announce_weights: bool = Field(
        False, description="codebook updates carry the serving weights too, so subscribers mirror the exact "
        "snapshot (a serving fleet can follow this learner); larger updates",
    )
    signing_key: Path | None = Field(
        None, description="sign every codebook update with this key file: an Ed25519 private key (PEM) or an "
        "HMAC-SHA256 shared key (32+ raw bytes); docs/codebook-updates.md. None: updates are unsigned",
    )
    min_utilisation: float = Field(
        0.05, ge=0, le=1, description="health gate: level-1 codebook utilisation floor"
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of the learner")
    switch_interval: float = Field(
        0.0005,
        gt=0,
        le=0.1,
        description="seconds a thread may hold the GIL while another waits for it (sys.setswitchinterval; "
        "Python's default is 0.005). The learner thread needs the GIL between torch ops, hundreds of times per "
        "step; while the event loop is busy each of those waits lasts up to this long, so the default would "
        "stretch a step many times over and serialise the learner behind ingest",
    )

    # --- recovery (streams.worker's module doc)
    warm_start: bool = Field(
        True,
        description="start from the store's latest snapshot of model_name when there is one: its weights, step "
        "count and train-topic position (False: a fresh model; versions still continue from the store's highest)",
    )
    processed_log: Path | None = Field(
        None,
        description="append a JSON line here per learnt micro-batch (its event ids and train-topic offsets) and "
        "per start (the snapshot resumed from): which events the model has learnt, for audits and tests",
    )

    # --- model (see trainer.config)
    initial_items: int = Field(
        0, ge=0, description="item table capacity at start; it grows with the catalogue"
    )
    num_attributes: int = Field(
        1024, ge=0, description="attribute vocabulary; larger attribute ids are ignored"
    )
    dim: int = Field(64, ge=1)
    max_len: int = Field(50, ge=1, description="history length kept per user and seen by the encoder")
    layers: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    levels: int = Field(3, ge=1)
    codes: int = Field(64, ge=2)
    top_codes: int = Field(4, ge=1, description="codes soft search draws per user")
    retrieval_loss: Literal["full", "sampled"] = "full"
    # the online defaults (trainer.config.ONLINE_TRAINING), not SparcConfig's offline ones
    attribute_dropout: float = Field(
        ONLINE_TRAINING["attribute_dropout"], ge=0, lt=1,
        description="dropout on the item tower's attribute term while training (0: none)",
    )
    conditioned_detach: bool = Field(
        ONLINE_TRAINING["conditioned_detach"],
        description="the code-conditioned loss trains only the tower's own weights, not h and z",
    )
    lr: float = Field(1e-3, gt=0)
    seed: int = 0

    @field_validator("table_store")
    @classmethod
    def _known_table_store(cls, value: str) -> str:
        if value not in ("rocksdb://", "memory://"):
            raise ValueError("table_store must be rocksdb:// or memory://")
        return value

    @property
    def train_topic(self) -> str:
        """Internal topic of training examples (one partition: one trainer), unique per app id."""
        return f"{self.app_id}-train-examples"

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.broker.split(",") if s.strip()]

    def sparc_config(self) -> SparcConfig:
        encoder = EncoderConfig(
            dim=self.dim, max_len=self.max_len, layers=self.layers, heads=self.heads, dropout=self.dropout
        )
        return SparcConfig(
            num_items=self.initial_items,
            num_attributes=self.num_attributes,
            encoder=encoder,
            levels=self.levels,
            codes=self.codes,
            retrieval_loss=self.retrieval_loss,
            attribute_dropout=self.attribute_dropout,
            conditioned_detach=self.conditioned_detach,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, lr=self.lr, seed=self.seed)
