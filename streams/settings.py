"""The worker's settings: connections, topic names, batching, publishing and the model's shape.

This is the only module of the worker that reads the environment or a config file. Every field comes, first match
wins, from:
  1. keyword arguments (`WorkerSettings(...)`; the CLI's flags),
  2. the environment as `SPARC_<FIELD>` (e.g. SPARC_BROKER=127.0.0.1:39092, SPARC_BATCH_SIZE=128),
  3. a TOML config file (`WorkerSettings.load(config_file=...)`; the CLI's `--config FILE`), whose sections
     group the fields (SECTIONS: [kafka], [topics], [web], ...),
  4. the defaults below.
So an environment variable (a Kubernetes Secret, say) overrides the file (a ConfigMap), and a flag overrides both.
Faust's own unprefixed variables (WEB_PORT, BROKER_URL, ...) are never read (streams.app).

Secrets: `sasl_password` and `ssl_key_password` are SecretStr (masked in reprs and `sparc config show`); each can
instead be read from a file (`sasl_password_file`, `ssl_key_password_file`: a mounted Kubernetes Secret).
The model hyperparameters become a SparcConfig/TrainConfig; the connection a streams.kafka_connection
KafkaConnection.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streams.gate import GateThresholds
from streams.kafka_connection import KafkaConfigError, KafkaConnection, SaslMechanism, SecurityProtocol, parse_bootstrap
from trainer.config import (
    EXPLORATION,
    ONLINE_TRAINING,
    CatalogueConfig,
    EncoderConfig,
    ExplorationConfig,
    SparcConfig,
    TrainConfig,
)

DAY_MS = 24 * 3600 * 1000
HISTORY_TABLE = "user-history"  # the worker's Faust table; Faust names its changelog topic after it

# The config file's sections: which fields each holds (`sparc config show` prints them in this order). A field
# named in none belongs to DEFAULT_SECTION.
SECTIONS: dict[str, tuple[str, ...]] = {
    "kafka": ("broker", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
              "sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password",
              "ssl_key_password_file", "ssl_check_hostname", "session_timeout", "group_instance_id", "fetch_bytes",
              "producer_linger"),
    "topics": ("feedback_topic", "item_topic", "updates_topic", "dlq_topic", "partitions", "train_partitions",
               "replication_factor", "min_insync_replicas", "events_retention_ms", "train_retention_ms",
               "dlq_retention_ms", "updates_retention_ms"),
    "worker": ("app_id", "store_url", "model_name", "data_dir", "table_store", "warm_start", "on_corrupt",
               "processed_log", "torch_threads", "device", "switch_interval"),
    "web": ("web_host", "web_port"),
    "logging": ("log_format", "log_level"),
    "ingest": ("max_event_bytes", "dedup_window", "batch_size", "batch_seconds", "train_message_bytes",
               "on_wrong_key", "table_standby_replicas"),
    "learn": ("world_size", "rank", "dist_url", "round_seconds"),
    "serve": ("follow_seconds", "exploration", "exploit", "lift"),
    "catalogue": ("max_items", "on_catalogue_full", "item_sources", "initial_items"),
    "publish": ("snapshot_every_steps", "snapshot_every_seconds", "keep_versions", "min_utilisation",
                "min_deep_utilisation", "min_perplexity", "max_collision_rate"),
    "model": ("num_attributes", "dim", "max_len", "layers", "heads", "dropout", "levels", "codes",
              "top_codes", "retrieval_loss", "attribute_dropout", "conditioned_detach", "ema_decay",
              "code_hysteresis", "lr", "seed"),
}
DEFAULT_SECTION = "worker"
SECRETS = ("sasl_password", "ssl_key_password")  # each may come from <name>_file instead

_config_file_values: ContextVar[Mapping[str, Any]] = ContextVar(
    "sparc_config_file_values", default=MappingProxyType({})
)


class ConfigError(ValueError):
    """A config file or setting that cannot be used; the message is one line, without secrets."""


def section_of(field: str) -> str:
    for section, fields in SECTIONS.items():
        if field in fields:
            return section
    return DEFAULT_SECTION


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML config file as {field: value}: `[section] field = value`, each field in its own section (SECTIONS);
    top-level fields are accepted too. Raises ConfigError naming the file and what is wrong."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    fields = WorkerSettings.model_fields
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS and key != DEFAULT_SECTION:
                raise ConfigError(f"{path}: unknown section [{key}] (sections: {', '.join(SECTIONS)})")
            items = value.items()
        else:
            key, items = "", [(key, value)]
        for name, item in items:
            where = f"[{key}] {name}" if key else name
            if name not in fields:
                raise ConfigError(f"{path}: {where}: no such setting (sparc config show lists them)")
            if key and section_of(name) != key:
                raise ConfigError(f"{path}: {where}: {name} belongs in [{section_of(name)}]")
            values[name] = item
    return values


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The values of the config file being loaded (WorkerSettings.load), below the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _config_file_values.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_config_file_values.get())


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARC_", frozen=True, extra="forbid")

    # --- connections and names
    broker: str = Field(
        "127.0.0.1:39092", description="Kafka bootstrap servers: host:port[,host:port] or kafka://host:port[,...]"
    )
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, for every Kafka client of the project"
    )
    sasl_mechanism: SaslMechanism | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="prefer SPARC_SASL_PASSWORD or sasl_password_file")
    sasl_password_file: Path | None = Field(None, description="read the SASL password from this file")
    ssl_cafile: Path | None = Field(None, description="CA certificates (PEM) that sign the brokers' (default: system)")
    ssl_certfile: Path | None = Field(None, description="client certificate (PEM), for brokers that require one")
    ssl_keyfile: Path | None = Field(None, description="the client certificate's private key (PEM)")
    ssl_key_password: SecretStr | None = Field(None, description="password of an encrypted ssl_keyfile")
    ssl_key_password_file: Path | None = Field(None, description="read ssl_key_password from this file")
    ssl_check_hostname: bool = Field(True, description="check that the broker's certificate names its host")
    app_id: str = Field(
        "sparc-worker", description="Faust app id = Kafka consumer group; prefixes internal topics"
    )
    feedback_topic: str = "feedback-events"
    item_topic: str = "item-events"
    updates_topic: str = "codebook-updates"
    dlq_topic: str = "feedback-dlq"
    partitions: int = Field(
        4, ge=1, description="partitions of the feedback/item/DLQ topics, of the repartition topic and of the tables"
    )
    train_partitions: int | None = Field(
        None, ge=1, description="partitions of the train topic (None: as many as `partitions`); a user's examples "
        "stay in one of them, in order; learner ranks split them (a multiple of world_size keeps ranks even)",
    )
    replication_factor: int | None = Field(
        None, ge=1, description="replicas of every topic the worker creates, its table changelogs included "
        "(None: the cluster's default.replication.factor, read from a broker at start)",
    )
    min_insync_replicas: int | None = Field(
        None, ge=1, description="min.insync.replicas of every topic the worker creates (None: the broker's)"
    )
    events_retention_ms: int = Field(
        7 * DAY_MS, ge=-1, description="retention.ms of the feedback topic (-1: forever); item-events is "
        "compacted (the latest event per item is kept), the table changelogs too",
    )
    train_retention_ms: int = Field(
        7 * DAY_MS, ge=-1, description="retention.ms of the train topic: a worker that is down longer than this "
        "loses the micro-batches its latest snapshot has not learnt",
    )
    dlq_retention_ms: int = Field(14 * DAY_MS, ge=-1, description="retention.ms of the dead-letter topic")
    updates_retention_ms: int = Field(
        7 * DAY_MS, ge=-1, description="retention.ms of codebook-updates: a new subscriber reads the topic from "
        "its start, so it must hold the last update that carries the whole item table",
    )
    store_url: str = Field(
        "rocksdb://./state/snapshots", description="codebook store (codebook_store.open_store)"
    )
    model_name: str = "sparc"
    data_dir: Path = Field(Path("./state/faust"), description="Faust's table state (RocksDB) lives here")
    table_store: str = Field("rocksdb://", description="Faust table store; memory:// only for tests")
    web_host: str = Field("127.0.0.1", description="address the web server binds (0.0.0.0: every interface)")
    web_port: int = Field(6066, ge=1, le=65535)
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON object per line")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    session_timeout: float = Field(
        10.0,
        ge=6.0,
        description="seconds a silent (crashed) ingest process or worker keeps its feedback partitions before the "
        "group moves them to another member; the broker's group.min.session.timeout.ms (6 s by default) is the "
        "floor (README, Running at scale: failover)",
    )
    group_instance_id: str | None = Field(
        None, min_length=1, max_length=249,
        description="static group membership (Kafka's group.instance.id; unique per process of the app, e.g. the "
        "pod name): a process restarted under the same id takes its partitions back at once, without a "
        "rebalance of the group (None: dynamic membership)",
    )

    # --- ingest
    max_event_bytes: int = Field(16_384, ge=64, description="larger messages go to the DLQ unread")
    dedup_window: int = Field(256, ge=1, description="recent event ids remembered per user")
    on_wrong_key: Literal["repartition", "dlq"] = Field(
        "repartition", description="a feedback record that is not in its user's partition (its key is not the user "
        "id, or it was partitioned otherwise than by murmur2 of the user id): re-key it through the repartition "
        "topic (as Faust's group_by does) so that one partition holds each user's history, or dead-letter it "
        "(reason wrong_key)",
    )
    table_standby_replicas: int = Field(
        1, ge=0, description="standby copies of the history table that other ingest processes keep up to date from "
        "its changelog (Faust's table_standby_replicas): a process that takes over partitions after a failure "
        "has their table at hand instead of reading the changelog from its start",
    )

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
    keep_versions: int = Field(
        200, ge=0, description="versions of the model the store keeps: after each publication the oldest beyond "
        "this many are deleted (latest and the highest always stay, so versions never repeat); 0 keeps every "
        "version (unbounded: for an audit or an archive). At the default interval, 200 versions is over 3 hours",
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
    # the health gate (streams.gate: the runs its defaults come from)
    min_utilisation: float = Field(
        GateThresholds.min_utilisation, ge=0, le=1,
        description="health gate: level-1 utilisation floor, a share of the codewords the catalogue could fill "
        "(min(codes, items)); streams.gate has the runs the defaults come from",
    )
    min_deep_utilisation: float = Field(
        GateThresholds.min_deep_utilisation, ge=0, le=1,
        description="health gate: utilisation floor of every level below the first",
    )
    min_perplexity: float = Field(
        GateThresholds.min_perplexity, ge=0,
        le=1, description="health gate: level-1 perplexity floor (the effective number of codewords in use), a "
        "share of the codewords the catalogue could fill",
    )
    max_collision_rate: float = Field(
        GateThresholds.max_collision_rate, ge=0, le=1,
        description="health gate: ceiling on the share of items whose full code another item also has",
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of the learner")
    device: str = Field(
        "cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where the learner trains: cpu, cuda[:N] or auto (trainer.device); snapshots and serving stay "
        "on the CPU",
    )
    switch_interval: float = Field(
        0.0005,
        gt=0,
        le=0.1,
        description="seconds a thread may hold the GIL while another waits for it (sys.setswitchinterval; "
        "Python's default is 0.005). The learner thread needs the GIL between torch ops, hundreds of times per "
        "step; while the event loop is busy each of those waits lasts up to this long, so the default would "
        "stretch a step many times over and serialise the learner behind ingest",
    )

    # --- the learn role (streams.learning; README, Running at scale)
    world_size: int = Field(
        1, ge=1, description="learner processes that train one model together (torch.distributed, gloo on CPUs, "
        "nccl on GPUs); rank R reads the train partitions p with p mod world_size == R",
    )
    rank: int = Field(0, ge=0, description="this learner's rank in [0, world_size); rank 0 publishes")
    dist_url: str = Field(
        "env://", description="where the learner ranks meet (torch.distributed init_method): tcp://HOST:PORT of "
        "rank 0, or env:// (MASTER_ADDR and MASTER_PORT, as torchrun sets them)",
    )
    round_seconds: float = Field(
        0.05, gt=0, le=10, description="the longest a learner waits for train messages before it trains on "
        "what it has (and, with several ranks, before a round without examples goes by)",
    )

    # --- the serve role
    follow_seconds: float = Field(
        0.5, gt=0, description="how often a serve process checks the store for a new latest snapshot",
    )
    # /retrieve's exploration slots (trainer.config.ExplorationConfig: the defaults and how they were chosen)
    exploration: bool = Field(
        True, description="/retrieve lists longer than `exploit` fill their slots after the first `exploit` by "
        "p(i | u) / q(i)^lift (what a user takes unusually often for its popularity: discovery, README "
        "'Discovery'); False: plain soft search, as before (a request's exploit= and lift= override either way)",
    )
    exploit: int = Field(
        EXPLORATION.exploit, ge=1, description="with exploration: the first slots, plain soft search's (a list of "
        "k <= exploit is unchanged); at least top_codes",
    )
    lift: float = Field(
        EXPLORATION.lift, ge=0, allow_inf_nan=False,
        description="with exploration: the popularity exponent of the other slots",
    )

    # --- recovery (streams.worker's module doc)
    warm_start: bool = Field(
        True,
        description="start from the store's latest snapshot of model_name when there is one: its weights, step "
        "count and train-topic position (False: a fresh model; versions still continue from the store's highest)",
    )
    on_corrupt: Literal["fallback", "refuse"] = Field(
        "fallback",
        description="a warm start whose latest snapshot fails verification: fall back to the newest earlier "
        "version that passed the gate and verifies (with a warning naming the bad one; latest is rolled back to "
        "it), or refuse to start",
    )
    processed_log: Path | None = Field(
        None,
        description="append a JSON line here per learnt micro-batch (its event ids and train-topic offsets) and "
        "per start (the snapshot resumed from): which events the model has learnt, for audits and tests",
    )

    # --- the catalogue (trainer.config.CatalogueConfig, trainer.vocab)
    max_items: int = Field(
        100_000, ge=1, description="the most items the model holds (rows of its item table; the full softmax "
        "costs O(max_items) per step)",
    )
    on_catalogue_full: Literal["refuse", "evict"] = Field(
        "refuse", description="a new item when max_items are held: refuse it (item events to the DLQ with "
        "reason catalogue_full; feedback on it is not learnt and goes there too) or evict the least recently seen",
    )
    item_sources: Literal["items", "items_and_feedback"] = Field(
        "items_and_feedback", description="what may add an item: item events only (feedback on an unknown item "
        "goes to the DLQ, reason unknown_item), or feedback too (it may outrun the item's catalogue event)",
    )
    initial_items: int = Field(
        0, ge=0, description="items 1..N are known from the start (a catalogue whose ids are 1..N); others are "
        "added as they arrive",
    )

    # --- model (see trainer.config)
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
    # stable interests (README, "Stable interests": 0.99 and 3 keep level-1 churn at 5.5% per window on the Beauty
    # replay; opt-in: EMA 0.99 holds a fresh model's first snapshots under the health gate for longer)
    ema_decay: float = Field(
        0.95, gt=0, lt=1, description="the codebooks' EMA decay: higher moves codewords more slowly",
    )
    code_hysteresis: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="level-1 hysteresis: an item keeps its interest until another codeword is closer by this "
        "relative margin in squared distance (0: always the nearest)",
    )
    lr: float = Field(1e-3, gt=0)
    seed: int = 0

    @field_validator("broker")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        try:
            return ",".join(parse_bootstrap(value))
        except KafkaConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, values: Any) -> Any:
        """<secret>_file: the secret is the file's content (a trailing newline dropped)."""
        if not isinstance(values, dict):
            return values
        for name in SECRETS:
            path = values.get(f"{name}_file")
            if path is None:
                continue
            if values.get(name) is not None:
                raise ValueError(f"give {name} or {name}_file, not both")
            try:
                values = {**values, name: Path(path).read_text(encoding="utf-8").rstrip("\r\n")}
            except OSError as exc:
                raise ValueError(f"cannot read {name}_file {path}: {exc.strerror or exc}") from None
        return values

    @model_validator(mode="after")
    def _connection(self) -> WorkerSettings:
        try:
            self.kafka_connection()
        except ValidationError as exc:
            raise ValueError(exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")) from None
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls)

    @classmethod
    def load(cls, config_file: Path | None = None, **given: Any) -> WorkerSettings:
        """Settings from `given` (flags), the environment, then `config_file` (TOML) and the defaults."""
        token = _config_file_values.set(read_config_file(config_file) if config_file is not None else {})
        try:
            return cls(**given)
        finally:
            _config_file_values.reset(token)

    def kafka_connection(self) -> KafkaConnection:
        """The connection every Kafka client of the project uses (streams.kafka_connection): the servers, and the
        settings of the same names as KafkaConnection's fields."""
        same = set(KafkaConnection.model_fields) - {"bootstrap_servers"}
        return KafkaConnection(bootstrap_servers=tuple(self.bootstrap_servers), **{f: getattr(self, f) for f in same})

    @field_validator("table_store")
    @classmethod
    def _known_table_store(cls, value: str) -> str:
        if value not in ("rocksdb://", "memory://"):
            raise ValueError("table_store must be rocksdb:// or memory://")
        return value

    @model_validator(mode="after")
    def _slot_per_code(self) -> WorkerSettings:
        if self.exploration and self.exploit < self.top_codes:
            raise ValueError(f"exploit {self.exploit} is below top_codes {self.top_codes}: the first slots hold one "
                             "item per code searched")
        return self

    @model_validator(mode="after")
    def _rank_in_world(self) -> WorkerSettings:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        return self

    @property
    def train_topic(self) -> str:
        """Internal topic of training examples (micro-batches, one user's in one partition), unique per app id."""
        return f"{self.app_id}-train-examples"

    @property
    def train_topic_partitions(self) -> int:
        return self.train_partitions or self.partitions

    @property
    def repartition_topic(self) -> str:
        """Internal topic of feedback re-keyed by user (the records that arrived outside their user's partition)."""
        return f"{self.app_id}-feedback-by-user"

    @property
    def learn_group(self) -> str:
        """The consumer group under which learners commit the train positions their snapshots have learnt (they
        read by assignment, not as members of a group)."""
        return f"{self.app_id}-learn"

    @property
    def bootstrap_servers(self) -> list[str]:
        return self.broker.split(",")

    @property
    def changelog_topic(self) -> str:
        """The user-history table's changelog, which Faust creates (compacted)."""
        return f"{self.app_id}-{HISTORY_TABLE}-changelog"

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
            ema_decay=self.ema_decay,
            code_hysteresis=self.code_hysteresis,
        )

    def exploration_config(self) -> ExplorationConfig | None:
        """/retrieve's default exploration slots (None: off)."""
        return ExplorationConfig(self.exploit, self.lift) if self.exploration else None

    def train_config(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def gate_thresholds(self) -> GateThresholds:
        return GateThresholds(
            min_utilisation=self.min_utilisation,
            min_deep_utilisation=self.min_deep_utilisation,
            min_perplexity=self.min_perplexity,
            max_collision_rate=self.max_collision_rate,
        )

    def catalogue_config(self) -> CatalogueConfig:
        return CatalogueConfig(
            max_items=self.max_items, on_full=self.on_catalogue_full, item_sources=self.item_sources
        )
