"""Wire schemas (JSON, UTF-8) and the one place that turns raw Kafka bytes into them.

Every rejection carries a *reason* from a small fixed set (it becomes a Prometheus label and
a DLQ header, so its cardinality must stay bounded) and a human-readable *detail*.
Unknown fields are ignored so producers can add fields without breaking consumers.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from models.encoder import item_text

EventType = Literal[
    "view", "click", "add_to_cart", "purchase", "rate", "search", "comment", "dislike",
    "request",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]

#: 2100-01-01 in epoch ms: later timestamps are almost certainly seconds-vs-ms mix-ups.
MAX_TS_MS = 4_102_444_800_000

#: Ids are printable: control characters (C0, DEL, C1), zero-width characters and bidi
#: controls in an id are a producer bug or a spoof (two ids that look the same), not an
#: identity.
_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]*$"
UserId = Annotated[str, Field(min_length=1, max_length=256, pattern=_ID_PATTERN)]
ItemId = Annotated[str, Field(min_length=1, max_length=256, pattern=_ID_PATTERN)]
Scenario = Annotated[str, Field(min_length=1, max_length=64, pattern=_ID_PATTERN)]


class Reason(StrEnum):
    """Why a record went to a dead-letter topic (a bounded label set)."""

    OVERSIZE = "oversize"  # raw record above the configured byte limit, rejected before parsing
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"  # not JSON, truncated, NaN/Infinity literals, too deep
    NOT_OBJECT = "not_object"  # valid JSON but not an object
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"  # right type, value out of range or not allowed
    TOO_LONG = "too_long"  # a string field over its limit (ids, text)
    EMPTY_ID = "empty_id"
    BAD_TIMESTAMP = "bad_timestamp"
    UNKNOWN_ITEM = "unknown_item"  # valid event naming an item the catalog does not hold
    ID_COLLISION = "id_collision"  # two item ids with the same 63-bit hash (astronomically rare)
    PROCESSING_ERROR = "processing_error"  # a record that made the encoder/index fail alone
    MISROUTED = "misrouted"  # Kafka key is not the event's user_id: wrong partition for its state
    SCENARIO_LIMIT = "scenario_limit"  # a new scenario beyond `learner.max_scenarios`


class InvalidRecord(ValueError):
    """A record that cannot be used; `reason` is a :class:`Reason`, `detail` says what exactly,
    `event_type` the type of a valid event rejected for where it came from (metrics label)."""

    def __init__(self, reason: Reason, detail: str, event_type: str | None = None):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.event_type = event_type


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class BehaviorEvent(_Wire):
    """One user action. `item_id` may be null only for text events (search/comment).

    A `request` is no action: it asks for a fresh recommendation for (user, scenario) now,
    optionally with context `text` (e.g. the page's search box). It names no item, does not
    train, is not a prediction target and does not enter the user's history."""

    user_id: UserId
    item_id: ItemId | None = None
    event_type: EventType
    ts: int = Field(strict=True, ge=0, le=MAX_TS_MS, description="epoch milliseconds")
    value: float | None = Field(default=None, strict=True,
                                description="rating or other magnitude: a JSON number")
    text: str | None = Field(default=None, max_length=2000)
    scenario: Scenario = "default"

    @model_validator(mode="after")
    def _item_or_text(self) -> BehaviorEvent:
        if self.event_type == "request":
            if self.item_id is not None:
                raise PydanticCustomError("value_error", "a request names no item_id")
        elif self.item_id is None and not self.text:
            raise PydanticCustomError("missing", "item_id is null and no text is given")
        return self


class Item(_Wire):
    """A catalog entry; `deleted: true` (or a tombstone) removes it."""

    item_id: ItemId
    title: str = Field(default="", max_length=1000)
    text: str | None = Field(default=None, max_length=10_000)
    tags: list[Annotated[str, Field(max_length=100)]] = Field(default_factory=list, max_length=100)
    category: str | None = Field(default=None, max_length=200)
    scenarios: list[Scenario] | None = Field(
        default=None, max_length=1000,
        description="Where the item may be recommended; absent or null: everywhere.")
    deleted: bool = False

    @field_validator("title")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    def embedding_text(self) -> str:
        """The text the encoder sees (models.encoder.item_text: one recipe everywhere)."""
        return item_text(self.model_dump())


class RecommendedItem(_Wire):
    item_id: str
    score: float
    reason_item_id: str | None = None


class ModelInfo(_Wire):
    encoder: str
    index_version: int  # this worker's FAISS index build
    model_version: int  # the trainer's snapshot version served (0: the initial model)


class Recommendation(_Wire):
    user_id: str
    scenario: str = "default"
    items: list[RecommendedItem]
    generated_at: int
    source_event_ts: int
    model: ModelInfo
    learning_rate: float


#: orjson's "line 1 column 7 (char 6)": a record is one line, its file line is said elsewhere.
_JSON_POSITION = re.compile(r"line \d+ column (\d+) \(char \d+\)")

_TYPE_ERRORS = ("_type", "_parsing", "is_instance_of", "literal_error", "enum", "bool_")


def scores_a_list(event_type: str, item_id: str | None) -> bool:
    """Whether an event says how good the list its user was shown last was: it names an
    item the user wanted (searches and requests name none; a dislike is not wanted). The
    worker's online hit rate and the demo's next-event score count these events."""
    return item_id is not None and event_type != "dislike"


def _reason_for(err: dict[str, Any]) -> Reason:
    """Map one pydantic error to a reason; the order of the checks matters."""
    etype: str = err["type"]
    field = str(err["loc"][0]) if err["loc"] else ""
    if etype == "missing":
        return Reason.MISSING_FIELD
    if field == "ts":
        return Reason.BAD_TIMESTAMP if etype.startswith(("greater", "less")) or \
            _integral_number(err.get("input")) else Reason.WRONG_TYPE
    if etype == "string_too_short" and field in ("user_id", "item_id"):
        return Reason.EMPTY_ID
    if etype in ("string_too_long", "too_long"):
        return Reason.TOO_LONG
    if etype == "literal_error":  # of the right type (a string) but not one of the values
        return Reason.INVALID_VALUE if isinstance(err.get("input"), str) else Reason.WRONG_TYPE
    if any(t in etype for t in _TYPE_ERRORS):
        return Reason.WRONG_TYPE
    return Reason.INVALID_VALUE


def _integral_number(v: Any) -> bool:
    """A whole number that failed as an int: one beyond 64 bits (orjson reads it as float)."""
    return isinstance(v, float) and math.isfinite(v) and v.is_integer()


def loads_object(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Size check, UTF-8 check and JSON parse, in that order (cheap checks first)."""
    if raw is None:
        raise InvalidRecord(Reason.INVALID_JSON, "empty record (null value)")
    if len(raw) > max_bytes:
        raise InvalidRecord(Reason.OVERSIZE, f"{len(raw)} bytes > limit {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise InvalidRecord(Reason.INVALID_UTF8, str(uexc)[:200]) from None
        raise InvalidRecord(Reason.INVALID_JSON, _JSON_POSITION.sub(r"at column \1", str(exc))
                            [:200]) from None
    if not isinstance(obj, dict):
        raise InvalidRecord(Reason.NOT_OBJECT, f"top-level JSON is {type(obj).__name__}")
    return obj


def _validate(model: type[_Wire], obj: dict[str, Any]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=True)[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(record)"
        reason = _reason_for(err)
        msg = err["msg"]
        if err["type"] == "string_pattern_mismatch":
            msg = "contains a control, zero-width or bidi-control character"
        elif reason is Reason.BAD_TIMESTAMP and err["type"].endswith("_type"):
            msg = f"{err['input']:.0f} is outside 0..{MAX_TS_MS} (epoch milliseconds)"
        raise InvalidRecord(reason, f"{loc}: {msg}"[:300]) from None


def parse_event(raw: bytes | None, max_bytes: int) -> BehaviorEvent:
    """Raw Kafka value -> BehaviorEvent, or :class:`InvalidRecord` with a specific reason."""
    event = _validate(BehaviorEvent, loads_object(raw, max_bytes))
    if event.value is not None and not math.isfinite(event.value):  # belt and braces
        raise InvalidRecord(Reason.INVALID_VALUE, "value: not finite")
    return event


def parse_item(raw: bytes | None, max_bytes: int) -> Item:
    """Raw Kafka value -> Item, or :class:`InvalidRecord` with a specific reason."""
    return _validate(Item, loads_object(raw, max_bytes))


def dumps(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json"))


def recommendation_bytes(user_id: str, scenario: str, items: list[tuple[str, float, str | None]],
                         generated_at: int, source_event_ts: int, model: ModelInfo,
                         learning_rate: float) -> bytes:
    """The wire form of a Recommendation, written directly: the agent emits one per user per
    micro-batch, and building 1 + top_k pydantic models each time cost more than the index
    search. Same JSON as `dumps(Recommendation(...))` (tests/test_schemas.py checks)."""
    return orjson.dumps({
        "user_id": user_id,
        "scenario": scenario,
        "items": [{"item_id": i, "score": s, "reason_item_id": r} for i, s, r in items],
        "generated_at": generated_at,
        "source_event_ts": source_event_ts,
        "model": {"encoder": model.encoder, "index_version": model.index_version,
                  "model_version": model.model_version},
        "learning_rate": learning_rate,
    })
