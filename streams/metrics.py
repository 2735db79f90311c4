"""Prometheus metrics of a worker (prefix `streamrec_`, base units: seconds, items).

They live in the default registry, which Faust's own Prometheus sensors also use, so one
`/metrics` page (served by the worker's Faust web server) carries both.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from models.config import EVENT_TYPE_IDS

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_LR_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)

EVENTS = Counter(
    "streamrec_events", "Behavior events consumed, by type and outcome "
    "(applied, dlq, duplicate = replayed and skipped)", ["event_type", "outcome"]
)
DLQ = Counter("streamrec_dlq", "Records sent to a dead-letter topic, by source topic and reason",
              ["topic", "reason"])
REFETCHED = Counter(
    "streamrec_refetched_records", "Records the stream skipped (e.g. across a rebalance) and "
    "the agent read back from Kafka before going on", ["topic"]
)
BATCH_SIZE = Histogram("streamrec_batch_size", "Events per micro-batch", buckets=_BATCH_BUCKETS)
LINGER_SECONDS = Histogram(
    "streamrec_linger_seconds", "The longest Faust may wait for the next micro-batch to fill, "
    "chosen after each batch by the load (streams/linger.py; a full buffer ends the wait "
    "sooner; no samples while the linger is off)", buckets=_LATENCY_BUCKETS)
BATCHES_IN_FLIGHT = Gauge(
    "streamrec_batches_in_flight", "Batches started and not yet durable and committed (0 or 1; "
    "stuck at 1: a batch that cannot be delivered)"
)
STAGE_SECONDS = Histogram(
    "streamrec_stage_seconds", "Time per micro-batch stage", ["stage"], buckets=_LATENCY_BUCKETS
)
EVENT_TO_REC = Histogram(
    "streamrec_event_to_recommendation_seconds",
    "From an event's timestamp to the emit of the recommendation it produced",
    buckets=_LATENCY_BUCKETS,
)
RECOMMENDATIONS = Counter("streamrec_recommendations", "Recommendations emitted")
NEXT_EVENTS = Counter("streamrec_next_events", "Events with an item (dislikes aside) of users "
                      "this worker had served a list in the event's scenario")
NEXT_EVENT_HITS = Counter("streamrec_next_event_hits", "Of streamrec_next_events, those whose "
                          "item was in that list: their ratio is the online hit rate")
QUERIES = Counter("streamrec_queries", "Search texts the worker needed a vector for")
QUERY_CACHE_HITS = Counter("streamrec_query_cache_hits", "Search texts whose vector the "
                           "query cache held (`query_cache_size`): no encoder pass")
LOOP_STALL = Histogram(
    "streamrec_event_loop_stall_seconds", "How late the event loop ran a timer due every "
    "20 ms (streams/loop_stalls.py): the time it was blocked, when nothing else could run "
    "(no fetch, no delivery, no /metrics)", buckets=_LATENCY_BUCKETS)
LOOP_STALL_MAX = Gauge("streamrec_event_loop_stall_max_seconds",
                       "The longest event-loop stall since the worker started")
LEARNING_RATE = Histogram(
    "streamrec_learning_rate", "Per-user learning rate α after each step", buckets=_LR_BUCKETS
)
ONLINE_LOSS = Gauge("streamrec_online_loss", "EMA of the online next-item loss")
INDEX_ITEMS = Gauge("streamrec_index_items", "Items in the serving FAISS index")
INDEX_VERSION = Gauge("streamrec_index_version", "Version of the serving FAISS index")
USERS_ACTIVE = Gauge("streamrec_users_active", "Users with an event in the last 5 minutes")
CATALOG_ITEMS = Counter(
    "streamrec_catalog_items", "Catalog records processed, by outcome: `embedded` by the "
    "encoder, `unchanged` (the text's vector was known: no encoder pass), `rejected` (to the "
    "DLQ); and, applied from item-vectors on every worker, `upserted` and `deleted`",
    ["outcome"],
)
COVISIT_BYTES = Gauge(
    "streamrec_covisit_bytes", "Memory of the co-visitation counts: the one part of a worker's "
    "memory that grows with traffic (toward the item pairs users actually co-visit)"
)
CHECKPOINTS = Counter("streamrec_checkpoints", "The trainer's checkpoints, by outcome",
                      ["outcome"])
MODEL_VERSION = Gauge("streamrec_model_version", "Version of the trainer's snapshot served "
                      "(0: the initial model, no snapshot yet)")
SNAPSHOT_AGE = Gauge("streamrec_snapshot_age_seconds", "Seconds since the trainer last "
                     "published a snapshot or a heartbeat (as the serving worker saw it)")

# the trainer's (streams/trainer.py; registered in every process, used by the trainer)
TRAINER_EXAMPLES = Counter(
    "streamrec_trainer_examples", "Training examples the trainer read, by outcome (trained; "
    "duplicate = its source was trained before; dropped = target not in the catalog; invalid)",
    ["outcome"])
TRAINER_TRAINED = Gauge("streamrec_trainer_trained", "Examples trained since the start "
                        "(restored from the checkpoint): each event's example exactly once")
TRAINER_STEPS = Counter("streamrec_trainer_steps", "Gradient steps of the shared model")
TRAINER_LAG = Gauge("streamrec_trainer_lag", "Training examples in Kafka not yet read by "
                    "this trainer rank")
TRAINER_SECONDS = Histogram("streamrec_trainer_train_seconds", "Time per training round",
                            buckets=_LATENCY_BUCKETS)
SNAPSHOT_BYTES = Gauge("streamrec_snapshot_bytes", "Size of the last snapshot published",
                       ["kind"])
SNAPSHOT_SECONDS = Histogram("streamrec_snapshot_publish_seconds", "Time to encode and "
                             "publish a snapshot", buckets=_LATENCY_BUCKETS)
for _outcome in ("trained", "duplicate", "dropped", "invalid"):
    TRAINER_EXAMPLES.labels(outcome=_outcome)

# state: user-state table writes; commit: changelog delivery + offset commit (per batch)
STAGES = ("decode", "encode", "learn", "search", "emit", "state", "commit")
for _stage in STAGES:  # make every stage series exist from the start (dashboards, alerts)
    STAGE_SECONDS.labels(stage=_stage)
# Event counters from 0 as well: a series born at its first increment hides the counts made
# before Prometheus first saw it, which skews ratios such as the DLQ share right after start.
for _type in EVENT_TYPE_IDS:
    for _outcome in ("applied", "dlq", "duplicate"):
        EVENTS.labels(event_type=_type, outcome=_outcome)
for _type in ("invalid", "unknown"):  # records that never became a valid event
    EVENTS.labels(event_type=_type, outcome="dlq")
