"""Readers for real data: JSON Lines files, the MovieLens 100K layout and Ciao's reviews.

The project ships neither MovieLens (its licence forbids redistribution) nor Ciao (research
data), so callers pass the directory they downloaded. Readers return plain Item /
BehaviorEvent dicts, the same shapes the synthetic generator produces, so the demo,
benchmarks and evaluator take either source.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

#: The 19 MovieLens 100K genres, used when a directory lacks u.genre.
DEFAULT_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
_ENCODING = "latin-1"  # MovieLens 100K predates UTF-8 everywhere: titles like "Misérables"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one dict per non-blank line; a bad line raises ValueError naming its number."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(obj, dict):
                kind = type(obj).__name__
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {kind}")
            yield obj


def _read_genres(ml_dir: Path) -> list[str]:
    """Genre names by index from u.genre ("name|index" lines); the standard list if absent."""
    path = ml_dir / "u.genre"
    if not path.exists():
        return list(DEFAULT_GENRES)
    pairs = []
    for line in path.read_text(encoding=_ENCODING).splitlines():
        if line.strip():
            name, idx = line.rsplit("|", 1)
            pairs.append((int(idx), name))
    return [name for _, name in sorted(pairs)]


def _parse_item_line(line: str, genres: list[str]) -> dict:
    """id|title|release|video release|url|flags...; the title may itself contain '|'."""
    fields = line.split("|")
    n = len(genres)
    if len(fields) < 5 + n:
        raise ValueError(f"u.item line has {len(fields)} fields, expected {5 + n}: {line[:80]!r}")
    flags = fields[-n:]
    tags = [g for g, f in zip(genres, flags, strict=True) if f.strip() == "1"]
    return {
        "item_id": str(int(fields[0])),
        "title": "|".join(fields[1 : len(fields) - n - 3]).strip(),
        "text": None,
        "tags": tags,
        "category": tags[0] if tags else None,
        "deleted": False,
    }


def movielens_items(ml_dir: str | Path) -> list[dict]:
    """Item dicts from u.item: id as string, title, genre names as tags, first genre as category."""
    ml_dir = Path(ml_dir)
    genres = _read_genres(ml_dir)
    text = (ml_dir / "u.item").read_text(encoding=_ENCODING)
    return [_parse_item_line(line, genres) for line in text.splitlines() if line.strip()]


def _parse_rating_line(line: str) -> tuple[int, dict]:
    """A u.data line "user item rating seconds" -> (seconds, rate event dict)."""
    parts = line.split()
    if len(parts) != 4:
        raise ValueError(f"expected 4 fields (user item rating timestamp), got {len(parts)}")
    user, item, rating, seconds = parts
    try:
        sec = int(seconds)
        event = {"user_id": str(int(user)), "item_id": str(int(item)), "event_type": "rate",
                 "ts": sec * 1000, "value": float(rating), "text": None, "scenario": "default"}
    except ValueError as exc:
        raise ValueError(f"not a number: {exc}") from None
    return sec, event


def movielens_events(ml_dir: str | Path) -> list[dict]:
    """Rate events from u.data in time order (ties keep file order, so the replay is stable)."""
    rows = []
    with open(Path(ml_dir) / "u.data", encoding=_ENCODING) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.split():
                continue
            try:
                rows.append(_parse_rating_line(line))
            except ValueError as exc:
                raise ValueError(f"u.data:{lineno}: {exc}") from None
    rows.sort(key=lambda r: r[0])  # list.sort is stable
    return [event for _, event in rows]


@dataclass(frozen=True)
class SourceLine:
    """One record of an input file, before validation (the publishing tools check every
    line first and report each bad one by its number)."""

    number: int  # 1-based line number in the file
    raw: bytes  # the line as written, without its line break
    value: bytes | None  # the record as JSON (a JSON Lines line is its own); None: unreadable
    problem: str = ""  # why `value` is None


def source_lines(path: str | Path, what: str) -> Iterator[SourceLine]:
    """Every non-blank line of a JSON Lines file or a MovieLens u.item/u.data (`what`:
    items or events) in publishing order: file order, MovieLens ratings by timestamp."""
    p = Path(path)
    ml_dir = _movielens_dir(p)
    if ml_dir is None:
        _check_jsonl(p, what)
        with open(p, "rb") as fh:
            for number, line in enumerate(fh, start=1):
                raw = line.rstrip(b"\r\n")
                if raw.strip():
                    yield SourceLine(number, raw, raw)
        return
    name = "u.item" if what == "items" else "u.data"
    with open(ml_dir / name, "rb") as fh:
        lines = [(n, ln.rstrip(b"\r\n")) for n, ln in enumerate(fh, start=1) if ln.strip()]
    if what == "items":
        genres = _read_genres(ml_dir)
        yield from (_converted(n, raw, lambda t: _parse_item_line(t, genres)) for n, raw in lines)
        return
    out = [_converted(n, raw, lambda t: _parse_rating_line(t)[1]) for n, raw in lines]
    ts = [orjson.loads(x.value)["ts"] if x.value is not None else 0 for x in out]
    yield from (out[i] for i in sorted(range(len(out)), key=ts.__getitem__))


def _converted(number: int, raw: bytes, parse) -> SourceLine:
    try:
        return SourceLine(number, raw, orjson.dumps(parse(raw.decode(_ENCODING))))
    except ValueError as exc:
        return SourceLine(number, raw, None, str(exc))


def _check_jsonl(p: Path, what: str) -> None:
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    if not (p.is_file() and p.suffix in _JSONL_SUFFIXES):
        raise ValueError(
            f"cannot load {what} from {p}: expected a MovieLens directory (u.item/u.data), "
            f"u.item/u.data itself, or a {'/'.join(_JSONL_SUFFIXES)} file")


def _movielens_dir(path: Path) -> Path | None:
    """The MovieLens directory `path` names (itself, or the parent of u.item/u.data), if any."""
    if path.is_dir() and ((path / "u.item").exists() or (path / "u.data").exists()):
        return path
    if path.is_file() and path.name in ("u.item", "u.data"):
        return path.parent
    return None


def _load(path: str | Path, what: str) -> list[dict]:
    """Dispatch on the path's shape: MovieLens directory/file or a JSON Lines file."""
    p = Path(path)
    ml_dir = _movielens_dir(p)
    if ml_dir is not None:
        return movielens_items(ml_dir) if what == "items" else movielens_events(ml_dir)
    _check_jsonl(p, what)
    return list(read_jsonl(p))


def load_items(path: str | Path) -> list[dict]:
    """Catalog from a MovieLens directory/file or a JSON Lines file of Item objects. A JSON
    line's optional `scenarios` (where the item may be recommended) is kept as written."""
    return _load(path, "items")


def load_events(path: str | Path) -> list[dict]:
    """Events from a MovieLens directory/file or a JSON Lines file of BehaviorEvent objects.
    A JSON line's optional `scenario` is kept as written (the evaluator ranks within it)."""
    return _load(path, "events")


CIAO_FILE = "interactions.csv.gz"
_CIAO_COLUMNS = ("user_id", "item_id", "category_id", "rating", "helpfulness", "timestamp",
                 "category")
_DAY_S = 86_400


def _ciao_rows(path: Path) -> list[dict]:
    """The csv's rows, checked for Ciao's header; a bad row raises ValueError naming it."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != _CIAO_COLUMNS:
            raise ValueError(f"{path}: expected columns {','.join(_CIAO_COLUMNS)}, "
                             f"got {reader.fieldnames}")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            try:
                rows.append({"user": str(int(row["user_id"])), "item": str(int(row["item_id"])),
                             "sec": int(row["timestamp"]), "rating": float(row["rating"]),
                             "category": row["category"].strip()})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
    return rows


def _ciao_subset(rows: list[dict], last_days: int | None, min_item_events: int) -> list[dict]:
    """The rows of the last `last_days` distinct days, then of the items with at least
    `min_item_events` rows among those (counted once, not repeated to a fixed point)."""
    if last_days is not None:
        days = sorted({r["sec"] // _DAY_S for r in rows})
        first = days[-last_days] if last_days < len(days) else days[0]
        rows = [r for r in rows if r["sec"] // _DAY_S >= first]
    if min_item_events > 1:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["item"]] = counts.get(r["item"], 0) + 1
        rows = [r for r in rows if counts[r["item"]] >= min_item_events]
    return rows


def ciao(ciao_dir: str | Path, last_days: int | None = None, min_item_events: int = 1
         ) -> tuple[list[dict], list[dict]]:
    """(items, events) of Ciao's `interactions.csv.gz` (README of the data: one row per
    rating, each item in one of 28 categories), as Item / BehaviorEvent dicts.

    The category is the scenario: each event's `scenario` is its row's category, and each
    item's `scenarios` lists every category it appears under (101 items have two), so it is
    ranked only where it may be shown. Ciao has no titles or descriptions, so the item
    tower's text is the category name(s) alone (`text`), the only content there is.
    Events are `rate` events (value = the rating) in time order; timestamps are whole days
    and the order within a day is the file's (arbitrary), so evaluate a day at once
    (`prequential(..., by_day=True)`). Repeated (user, item) rows stay events: a re-rating
    is behaviour too, and the serving rule decides whether it is evaluated.

    Subsets, for runs that must fit a time budget: `last_days` keeps the last N distinct
    days; `min_item_events` then keeps items with at least that many rows in what is left
    (the usual item-count filter: it looks at the whole window, so say so when reporting).
    The catalog is the items of the kept rows."""
    rows = _ciao_subset(_ciao_rows(Path(ciao_dir) / CIAO_FILE), last_days, min_item_events)
    rows.sort(key=lambda r: r["sec"])  # stable: the file's order within a day
    where: dict[str, list[str]] = {}
    for r in rows:
        cats = where.setdefault(r["item"], [])
        if r["category"] not in cats:
            cats.append(r["category"])
    items = [{"item_id": item, "title": "", "text": ", ".join(cats), "tags": [],
              "category": None, "scenarios": cats, "deleted": False}
             for item, cats in where.items()]
    events = [{"user_id": r["user"], "item_id": r["item"], "event_type": "rate",
               "ts": r["sec"] * 1000, "value": r["rating"], "text": None,
               "scenario": r["category"]} for r in rows]
    return items, events
