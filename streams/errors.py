"""Errors a person can act on: what went wrong and which setting or file to check.

The CLI prints one of these as a single line and exits with code 2, no traceback (a
traceback is for bugs). Anything that names a cause the user controls raises one: an
unreachable broker, a data directory that cannot be created, a missing file, a bad setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError


class UserError(Exception):
    """A problem with the environment or the input, not with streamrec: exit code 2."""


class BrokerUnreachable(UserError):
    """No Kafka broker answered at the configured address within the wait."""


def settings_problem(exc: ValidationError) -> UserError:
    """A settings ValidationError as one line naming each environment variable at fault
    and, for a value with parts (a strategy's parameters), the part."""
    from streams.settings import Settings

    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        group = Settings.model_fields.get(loc[0])
        depth = 2 if group and isinstance(group.annotation, type) and issubclass(
            group.annotation, BaseModel) and len(loc) > 1 else 1
        name, inner = "__".join(loc[:depth]), ".".join(loc[depth:])
        where = f" (at {inner})" if inner else ""
        parts.append(f"STREAMREC_{name.upper()}{where}={err.get('input')!r}: {err['msg']}")
    return UserError("bad setting: " + "; ".join(parts))
