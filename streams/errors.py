"""Errors a person can act on: what went wrong and which setting or file to check.

The CLI prints one of these as a single line and exits with code 2, no traceback (a
traceback is for bugs). Anything that names a cause the user controls raises one: an
unreachable broker, a data directory that cannot be created, a missing file, a bad setting.
"""

from __future__ import annotations

from pydantic import ValidationError


class UserError(Exception):
    """A problem with the environment or the input, not with streamrec: exit code 2."""


class BrokerUnreachable(UserError):
    """No Kafka broker answered at the configured address within the wait."""


def settings_problem(exc: ValidationError) -> UserError:
    """A settings ValidationError as one line naming each environment variable at fault
    and, for a value with parts (a strategy's parameters), the part."""
    from streams.settings import variable_of

    parts = []
    for err in exc.errors(include_url=False):
        name, inner = variable_of(err["loc"])
        where = f" (at {inner})" if inner else ""
        parts.append(f"{name}{where}={err.get('input')!r}: {err['msg']}")
    return UserError("bad setting: " + "; ".join(parts))
