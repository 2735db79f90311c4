#!/bin/sh
# One-shot topic creation for the compose stack (service `topic-init`, apache/kafka image).
# Idempotent (--if-not-exists); existing topics are left as they are.
# Must match streams/topics.py::topic_specs (tests/test_deploy.py compares them). Workers and
# the trainer also create missing topics themselves, with the same specs, but creating them
# here, before either starts, keeps partitions and retention under the operator's control.
set -eu

BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
PREFIX="${STREAMREC_TOPIC_PREFIX:-}"
PARTITIONS="${STREAMREC_PARTITIONS:-8}"
RF="${STREAMREC_REPLICATION_FACTOR:-1}"
WEEK_MS=604800000
# Checkpoint and snapshot chunks are up to 512 KiB (checkpoint_chunk_bytes); 2x that or
# Kafka's default.
CHECKPOINT_MAX_BYTES=1048588

create() {
  topic="$PREFIX$1"; partitions="$2"; shift 2
  /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
    --topic "$topic" --partitions "$partitions" --replication-factor "$RF" "$@"
}

# inputs
create behavior-events     "$PARTITIONS" --config retention.ms=$WEEK_MS
create item-catalog        "$PARTITIONS" --config cleanup.policy=compact
# state shared by all workers: the newest record per key is the state
create item-vectors        "$PARTITIONS" --config cleanup.policy=compact
# workers -> trainer: one example per applied event, on its source event's partition number
# (so as many partitions as behavior-events); a week of retention is what a stopped trainer
# can catch up on
create training-examples   "$PARTITIONS" --config retention.ms=$WEEK_MS
# trainer -> workers: versions of the shared model (one partition: read in order, in full)
create model-snapshots     1             --config cleanup.policy=compact --config max.message.bytes=$CHECKPOINT_MAX_BYTES
# the trainer's own checkpoints (only the trainer writes here)
create model-checkpoints   1             --config cleanup.policy=compact --config max.message.bytes=$CHECKPOINT_MAX_BYTES
# outputs
create recommendations     "$PARTITIONS" --config retention.ms=$WEEK_MS
create behavior-events-dlq "$PARTITIONS" --config retention.ms=$WEEK_MS
create item-catalog-dlq    "$PARTITIONS" --config retention.ms=$WEEK_MS

/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --list
