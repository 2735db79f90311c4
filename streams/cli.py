"""`streamrec` command line: worker, broker, demo, catalog load, publish, tail, config.

Errors a person can act on (an unreachable broker, a bad setting, a missing file, a data
directory that cannot be created) print one line naming the cause and exit with code 2;
tracebacks are for bugs (and for `--verbose`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import orjson
from pydantic import ValidationError

from streams.errors import UserError, settings_problem
from streams.logs import configure_logging
from streams.settings import Settings, unknown_variables

log = logging.getLogger("streamrec.cli")


class Failure(click.ClickException):
    """A UserError on its way out: click prints `Error: <message>` on stderr, exit 2."""

    exit_code = 2


class _Commands(click.Group):
    """Turns the errors a person can act on into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        unknown = unknown_variables(os.environ)
        if unknown:
            raise Failure(f"not a setting: {', '.join(unknown)}. See `streamrec config` for "
                          "the settings and docs/operations.md for their variables")
        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            if exc.title != "Settings":
                raise
            raise Failure(str(settings_problem(exc))) from None
        except UserError as exc:
            log.debug("user error", exc_info=True)
            raise Failure(str(exc)) from None
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            log.debug("file error", exc_info=True)
            raise Failure(str(exc)) from None


def _settings(broker: str | None, **overrides: object) -> Settings:
    kw = {k: v for k, v in overrides.items() if v is not None}
    if broker:
        kw["broker"] = broker
    return Settings(**kw)


broker_option = click.option(
    "--broker", default=None, help="kafka://host:port (default: $STREAMREC_BROKER or settings)."
)


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, Kafka client lines included.")
def main(verbose: bool) -> None:
    """streamrec: a real-time streaming recommender on Kafka."""
    configure_logging(verbose)


@main.command()
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Local state directory (default: $STREAMREC_DATA_DIR or var/streamrec); "
              "created if missing.")
@broker_option
def worker(data_dir: str | None, broker: str | None) -> None:
    """Run a worker (Faust): consume events and catalog, learn, recommend."""
    from streams.app import run_worker

    sys.argv = [sys.argv[0]]  # Faust's worker reads argv; it must not see our options
    run_worker(_settings(broker, data_dir=data_dir))


@main.command()
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trainer processes (torch.distributed, gloo on CPU, NCCL on GPU); with "
              "RANK and WORLD_SIZE in the environment (torchrun, one pod per rank) this process "
              "is that one rank.")
@broker_option
def trainer(ranks: int, broker: str | None) -> None:
    """Run the trainer: training examples in, snapshots of the shared model out."""
    from streams.trainer import run_ranks

    run_ranks(_settings(broker), ranks)


SECURE_USERS = ("worker", "trainer", "publisher", "consumer")


def _secure_setup(data_dir: Path) -> Any:
    import secrets

    from streams.broker_security import BrokerSecurity

    return BrokerSecurity.create(data_dir / "tls", {u: secrets.token_urlsafe(12)
                                                    for u in SECURE_USERS})


def _print_secure(kafka: Any) -> None:
    """Grant every role its ACLs, and print the settings each one runs with."""
    from streams import acls
    from streams.topics import ensure_topics

    sec = kafka.security
    admin = _settings(kafka.url, **sec.client())
    ensure_topics(admin)
    for user in SECURE_USERS:  # each user is named for its role
        acls.apply(admin, f"User:{user}", acls.grants(admin, user))  # type: ignore[arg-type]
    click.echo(f"export STREAMREC_SECURITY_PROTOCOL=SASL_SSL STREAMREC_SASL_MECHANISM="
               f"SCRAM-SHA-512 STREAMREC_SSL_CAFILE={sec.ca_file}")
    for user in ("admin", *SECURE_USERS):
        click.echo(f"  as {user:<9}: export STREAMREC_SASL_USERNAME={user} "
                   f"STREAMREC_SASL_PASSWORD={sec.users[user]}")


def _exit_on_sigterm() -> None:
    """SIGTERM (and SIGHUP: the terminal closed) unwind like Ctrl-C, so `with` blocks and
    atexit hooks run: the broker's JVM is stopped and its temp directory removed. SIGINT too,
    explicitly: a process started in the background by a non-interactive shell inherits it
    ignored, and Python then leaves it ignored (seen: a CI run's broker ignored Ctrl-C)."""
    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)


@main.command()
@click.option("--port", type=int, default=None,
              help="Listener port (default: 9092, the settings' default, when free; else any).")
@click.option("--data-dir", default=None,
              help="Log directory, kept on exit (default: a temp dir, removed on exit).")
@click.option("--secure", is_flag=True,
              help="A SASL_SSL listener: TLS from a CA made now, SCRAM-SHA-512 users admin, "
              "worker, trainer, publisher, consumer, and ACLs required (each role's granted).")
def broker(port: int | None, data_dir: str | None, secure: bool) -> None:
    """Run the embedded Apache Kafka broker (KRaft) until Ctrl-C or SIGTERM."""
    from streams.broker import EmbeddedKafka
    from streams.ports import port_free

    if port is None and port_free(9092):
        port = 9092
    _exit_on_sigterm()
    try:
        kafka = EmbeddedKafka(data_dir=data_dir, port=port)
        if secure:
            kafka.security = _secure_setup(kafka.data_dir)
        with kafka:
            where = "removed on exit" if data_dir is None else "kept"
            click.echo(f"Kafka broker ready at {kafka.bootstrap} (data in {kafka.data_dir}, "
                       f"{where}). In other shells:")
            click.echo(f"export STREAMREC_BROKER={kafka.url}", nl=True)
            if secure:
                _print_secure(kafka)
            sys.stdout.flush()
            while kafka.running:
                time.sleep(0.5)
            raise UserError(f"the broker exited on its own; see {kafka.log_path}")
    except KeyboardInterrupt:
        click.echo("broker stopped", err=True)


@main.command("acls")
@click.argument("role", type=click.Choice(["worker", "trainer", "publisher", "consumer"]))
@click.argument("principal")
@click.option("--group", default=None, help="consumer: the downstream consumer's group.")
@click.option("--apply", "apply_", is_flag=True,
              help="Create them on the broker (run with an admin's credentials).")
@broker_option
def acls_(role: str, principal: str, group: str | None, apply_: bool,
          broker: str | None) -> None:
    """The ACLs a role needs (least privilege), for PRINCIPAL (e.g. User:worker)."""
    from streams import acls

    s = _settings(broker)
    wanted = acls.grants(s, role, group)  # type: ignore[arg-type]
    for g in wanted:
        pattern = "prefixed" if g.prefixed else "literal"
        click.echo(f"{principal} ALLOW {','.join(g.operations)} on {g.resource} {g.name} "
                   f"({pattern})")
    if apply_:
        click.echo(f"created {acls.apply(s, principal, wanted)} ACLs")


@main.group()
def catalog() -> None:
    """Catalog commands."""


def _publish_file(path: str, what: str, broker: str | None, skip_invalid: bool,
                  limit: int | None, rate: float | None = None) -> None:
    """Validate the whole file, then send all of it, the valid part (--skip-invalid), or
    nothing; say what the broker acknowledged."""
    from streams import acls
    from streams.clients import wait_for_broker
    from streams.publish import check_file, publish_checked, write_rejected
    from streams.topics import ensure_topics

    s = _settings(broker)
    try:
        checked = check_file(s, path, what, limit)
    except ValueError as exc:  # not a file of a kind we read (names the kinds we do)
        raise UserError(str(exc)) from None
    for line, reason, detail in checked.bad[:20]:
        click.echo(f"{path}:{line.number}: {reason}: {detail}", err=True)
    if len(checked.bad) > 20:
        click.echo(f"... and {len(checked.bad) - 20:,} more invalid lines", err=True)
    if checked.bad and not skip_invalid:
        good = len(checked.good)
        raise UserError(f"{len(checked.bad):,} of {len(checked.bad) + good:,} lines of {path} "
                        f"are invalid; nothing was sent (fix them, or pass --skip-invalid to "
                        f"send the {good:,} valid line{'' if good == 1 else 's'})")
    if checked.bad:
        out = write_rejected(path, checked.bad)
        click.echo(f"skipping {len(checked.bad):,} invalid lines (written to {out})", err=True)
    wait_for_broker(s)
    acls.check(s, "publisher")
    ensure_topics(s, role="publisher")
    topic = s.topic(s.catalog_topic if what == "items" else s.events_topic)
    sent, acked = publish_checked(s, topic, checked.good, rate=rate, label=what)
    click.echo(f"published {sent:,} {what} to {topic}: {acked:,} acknowledged by the broker")
    if acked < sent:
        raise click.ClickException(f"{sent - acked:,} of {sent:,} {what} were not "
                                   f"acknowledged by the broker at {s.broker}")


skip_invalid_option = click.option(
    "--skip-invalid", is_flag=True,
    help="Send the valid lines and write the invalid ones to <file>.rejected.jsonl beside the "
    "input (default: send nothing if any line is invalid).")
limit_option = click.option("--limit", type=click.IntRange(min=1), default=None,
                            help="Only the first N records of the file.")


@catalog.command("load")
@click.argument("path")
@skip_invalid_option
@limit_option
@broker_option
def catalog_load(path: str, skip_invalid: bool, limit: int | None, broker: str | None) -> None:
    """Publish items (JSONL in the Item schema, or a MovieLens u.item) to item-catalog.
    Every line is checked first, as the worker checks it."""
    _publish_file(path, "items", broker, skip_invalid, limit)


@main.command()
@click.argument("path")
@click.option("--rate", type=float, default=None, help="Events per second (default: max).")
@skip_invalid_option
@limit_option
@broker_option
def publish(path: str, rate: float | None, skip_invalid: bool, limit: int | None,
            broker: str | None) -> None:
    """Replay events (JSONL BehaviorEvents, or a MovieLens u.data in timestamp order).
    Every line is checked first, as the worker checks it."""
    _publish_file(path, "events", broker, skip_invalid, limit, rate)


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
@click.option("--ciao", "ciao_dir", type=click.Path(exists=True, file_okay=False),
              help="Ciao directory (interactions.csv.gz): 28 categories as scenarios, each "
              "event ranked within its category, a day at a time (implies --by-day).")
@click.option("--events", "events_path", type=click.Path(exists=True), help="BehaviorEvent JSONL.")
@click.option("--items", "items_path", type=click.Path(exists=True), help="Item JSONL.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--by-day", is_flag=True, help="A batch is one day of events, all scored against "
              "the state before that day (for timestamps that only say the day).")
@click.option("--last-days", type=click.IntRange(min=1), default=None,
              help="--ciao: only the last N days of the stream.")
@click.option("--min-item-events", type=click.IntRange(min=1), default=1, show_default=True,
              help="--ciao: only items with at least K events (in the kept days).")
@click.option("--models", "model_list", default=None,
              help="Comma-separated model names (default: streamrec, its ablations, all peers; "
              "with --ciao: streamrec, streamrec-shared, streamrec-separate, pop, itemknn_seq).")
@click.option("--no-ablations", is_flag=True, help="Only streamrec and the peers.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write figures here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG here.")
@click.option("--jobs", type=int, default=2, show_default=True, help="Models run in parallel.")
@click.option("--limit", type=int, default=None, help="Only the first N events (smoke runs).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="streamrec as N serving workers (users hashed to them) and one trainer.")
@click.option("--snapshot-every", type=click.IntRange(min=1), default=None,
              help="The trainer's snapshot reaches the workers every E events (default: after "
              "every batch, as the single in-process learner).")
@click.option("--independent", is_flag=True,
              help="With --workers: each worker its own model, trained on its users only.")
@click.option("--trainer-ranks", type=click.IntRange(min=1), default=1, show_default=True,
              help="The trainer as K ranks in lockstep, each training its share of the "
              "source partitions (threads here; torch.distributed processes when deployed).")
def eval_(ml_dir: str | None, ciao_dir: str | None, events_path: str | None,
          items_path: str | None, batch_size: int, by_day: bool, last_days: int | None,
          min_item_events: int, model_list: str | None, no_ablations: bool,
          json_path: str | None, plot_path: str | None, jobs: int, limit: int | None,
          workers: int, snapshot_every: int | None, independent: bool,
          trainer_ranks: int) -> None:
    """Prequential (test-then-train) evaluation with full ranking; no Kafka involved."""
    from evaluation import comparison as cmp

    unknown = [n for n in (model_list or "").split(",") if n and not cmp.is_known(n)]
    if unknown:
        raise click.BadParameter(f"unknown model(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(cmp.model_names())}", param_hint="--models")
    name, items, events = _eval_data(ml_dir, ciao_dir, events_path, items_path, last_days,
                                     min_item_events)
    by_day = by_day or ciao_dir is not None
    s = Settings()
    data = cmp.make_dataset(name, items, events[:limit] if limit else events,
                            s.text_encoder(device="cpu").encode, by_day=by_day)
    names = model_list.split(",") if model_list else list(cmp.SCENARIO_MODELS) if ciao_dir \
        else cmp.model_names(ablations=not no_ablations)
    deployed = cmp.sharded_name(workers, snapshot_every, independent, trainer_ranks)
    names = [deployed if n == "streamrec" else n for n in names]
    failures: dict[str, str] = {}
    results = cmp.run_comparison(data, names, batch_size, s.learner, jobs=jobs,
                                 exclude_seen=s.exclude_seen, failures=failures)
    doc = cmp.to_json(data, results, batch_size, failures)
    cmp.print_table(doc)
    if json_path:
        cmp.write_json(json_path, doc)
    if plot_path and results:
        batch = "a day" if by_day else batch_size
        cmp.plot(results, plot_path, f"{name}: NDCG@10 over the stream (batch {batch})")
    if failures:
        raise SystemExit(f"{len(failures)} of {len(names)} models failed: "
                         f"{', '.join(failures)} (the others' figures are above"
                         f"{' and in ' + json_path if json_path else ''})")


def _eval_data(ml_dir: str | None, ciao_dir: str | None, events_path: str | None,
               items_path: str | None, last_days: int | None, min_item_events: int
               ) -> tuple[str, list[dict], list[dict]]:
    """(name, items, events) of the one source the options name."""
    from evaluation.datasets import ciao, load_events, load_items, movielens_events, movielens_items

    if ml_dir:
        return "ml-100k", movielens_items(ml_dir), movielens_events(ml_dir)
    if ciao_dir:
        items, events = ciao(ciao_dir, last_days, min_item_events)
        days = "" if last_days is None else f", last {last_days} days"
        least = "" if min_item_events == 1 else f", items with >= {min_item_events} events"
        return f"ciao{days}{least}", items, events
    if events_path and items_path:
        return Path(events_path).stem, load_items(items_path), load_events(events_path)
    raise click.UsageError("give --movielens-100k DIR, --ciao DIR, or --events FILE and "
                           "--items FILE")


@main.command()
def config() -> None:
    """Print the effective settings (env STREAMREC_* applied) as JSON."""
    click.echo(orjson.dumps(Settings().model_dump(mode="json"), option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
