"""`streamrec` command line: worker, broker, demo, catalog load, publish, tail, config."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click
import orjson

from streams.settings import Settings


def _settings(broker: str | None, **overrides: object) -> Settings:
    kw = {k: v for k, v in overrides.items() if v is not None}
    if broker:
        kw["broker"] = broker
    return Settings(**kw)


broker_option = click.option(
    "--broker", default=None, help="kafka://host:port (default: $STREAMREC_BROKER or settings)."
)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """streamrec: a real-time streaming recommender on Kafka."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "aiokafka"):  # client chatter: connects, resets, metadata
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


@main.command()
@broker_option
def worker(broker: str | None) -> None:
    """Run a worker (Faust): consume events and catalog, learn, recommend."""
    from streams.app import run_worker

    sys.argv = [sys.argv[0]]  # Faust's worker reads argv; it must not see our options
    run_worker(_settings(broker))


@main.command()
@click.option("--port", type=int, default=None, help="Listener port (default: a free one).")
@click.option("--data-dir", default=None, help="Log directory (default: a temp dir).")
def broker(port: int | None, data_dir: str | None) -> None:
    """Run the embedded Apache Kafka broker (KRaft) until Ctrl-C."""
    from streams.broker import EmbeddedKafka

    with EmbeddedKafka(data_dir=data_dir, port=port) as kafka:
        kafka.start()
        click.echo(f"Kafka broker ready: {kafka.bootstrap}  (export STREAMREC_BROKER={kafka.url})")
        try:
            while kafka.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


@main.group()
def catalog() -> None:
    """Catalog commands."""


@catalog.command("load")
@click.argument("path")
@broker_option
def catalog_load(path: str, broker: str | None) -> None:
    """Publish items (JSONL in the Item schema, or a MovieLens u.item) to item-catalog."""
    from models.datasets import load_items
    from streams.publish import publish_items
    from streams.topics import ensure_topics

    s = _settings(broker)
    ensure_topics(s)
    items = load_items(path)
    n = publish_items(s, items)
    click.echo(f"published {n} items to {s.topic(s.catalog_topic)}")


@main.command()
@click.argument("path")
@click.option("--rate", type=float, default=None, help="Events per second (default: max).")
@broker_option
def publish(path: str, rate: float | None, broker: str | None) -> None:
    """Replay events (JSONL BehaviorEvents, or a MovieLens u.data in timestamp order)."""
    from models.datasets import load_events
    from streams.publish import publish_events
    from streams.topics import ensure_topics

    s = _settings(broker)
    ensure_topics(s)
    n = publish_events(s, load_events(path), rate=rate)
    click.echo(f"published {n} events to {s.topic(s.events_topic)}")


@main.command()
@click.option("--from-beginning", is_flag=True, help="Read the topic from its start.")
@click.option("--max", "max_n", type=int, default=None, help="Stop after N recommendations.")
@broker_option
def tail(from_beginning: bool, max_n: int | None, broker: str | None) -> None:
    """Print recommendations as they arrive (one JSON per line)."""
    from streams.tail import iter_recommendations

    for n, rec in enumerate(iter_recommendations(_settings(broker), from_beginning), 1):
        click.echo(orjson.dumps(rec).decode())
        if max_n and n >= max_n:
            break


@main.command()
@click.option("--events", "n_events", type=int, default=20_000, show_default=True,
              help="Events to replay (without --exit: keeps streaming after them).")
@click.option("--exit", "exit_", is_flag=True, help="Stop once N events are processed and "
              "print a JSON summary as the last line.")
@click.option("--rate", type=float, default=300.0, show_default=True, help="Events/s.")
@click.option("--items", "n_items", type=int, default=2000, show_default=True)
@click.option("--users", "n_users", type=int, default=500, show_default=True)
@broker_option
def demo(n_events: int, exit_: bool, rate: float, n_items: int, n_users: int,
         broker: str | None) -> None:
    """Embedded broker + worker + synthetic catalog and drifting users, live recommendations."""
    from streams.demo import run_demo

    summary = run_demo(broker=broker, n_events=n_events, exit_after=exit_, rate=rate,
                       n_items=n_items, n_users=n_users)
    if summary is not None:
        click.echo(orjson.dumps(summary).decode())


@main.command("eval")
@click.option("--movielens-100k", "ml_dir", type=click.Path(exists=True, file_okay=False),
              help="MovieLens 100K directory (u.data + u.item).")
@click.option("--events", "events_path", type=click.Path(exists=True), help="BehaviorEvent JSONL.")
@click.option("--items", "items_path", type=click.Path(exists=True), help="Item JSONL.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--models", "model_list", default=None,
              help="Comma-separated model names (default: streamrec, its ablations, all peers).")
@click.option("--no-ablations", is_flag=True, help="Only streamrec and the peers.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write figures here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG here.")
@click.option("--jobs", type=int, default=2, show_default=True, help="Models run in parallel.")
@click.option("--limit", type=int, default=None, help="Only the first N events (smoke runs).")
def eval_(ml_dir: str | None, events_path: str | None, items_path: str | None,
          batch_size: int, model_list: str | None, no_ablations: bool, json_path: str | None,
          plot_path: str | None, jobs: int, limit: int | None) -> None:
    """Prequential (test-then-train) evaluation with full ranking; no Kafka involved."""
    from models import comparison as cmp
    from models.datasets import load_events, load_items, movielens_events, movielens_items
    from models.encoder import TextEncoder

    if ml_dir:
        name, items, events = "ml-100k", movielens_items(ml_dir), movielens_events(ml_dir)
    elif events_path and items_path:
        name, items, events = Path(events_path).stem, load_items(items_path), \
            load_events(events_path)
    else:
        raise click.UsageError("give --movielens-100k DIR, or --events FILE and --items FILE")
    s = Settings()
    encoder = TextEncoder(s.encoder_path, device="cpu", batch_size=s.encoder_batch_size)
    data = cmp.make_dataset(name, items, events[:limit] if limit else events, encoder.encode)
    names = model_list.split(",") if model_list else cmp.model_names(ablations=not no_ablations)
    results = cmp.run_comparison(data, names, batch_size, s.learner, jobs=jobs)
    doc = cmp.to_json(data, results, batch_size)
    cmp.print_table(doc)
    if json_path:
        cmp.write_json(json_path, doc)
    if plot_path:
        cmp.plot(results, plot_path, f"{name}: NDCG@10 over the stream (batch {batch_size})")


@main.command()
def config() -> None:
    """Print the effective settings (env STREAMREC_* applied) as JSON."""
    click.echo(orjson.dumps(Settings().model_dump(mode="json"), option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
