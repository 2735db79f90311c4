"""What a strategy is: a small frozen class whose fields are its validated parameters.

LR rules (models/lr_rules.py), softmaxes (models/losses.py) and candidate sources
(models/candidates.py) are strategies. Each class has a `name` field, the name that settings
select it by. A settings field typed `choice(A | B | ...)` holds the built strategy and accepts
the object itself, a name alone (the class's defaults) or a mapping of the name and some
parameters. A parameter the class lacks, one out of range, or a name no class has is an error
that names it, so a misspelled setting never runs on a default.

>>> from typing import Literal
>>> from pydantic import TypeAdapter
>>> @strategy
... class Scaled:
...     name: Literal["scaled"] = "scaled"
...     by: float = 1.0
>>> @strategy
... class Shifted:
...     name: Literal["shifted"] = "shifted"
>>> pick = TypeAdapter(choice(Scaled | Shifted))
>>> pick.validate_python("scaled"), pick.validate_python({"name": "scaled", "by": 2})
(Scaled(name='scaled', by=1.0), Scaled(name='scaled', by=2.0))
>>> try:
...     pick.validate_python({"name": "shifted", "by": 2})
... except ValueError as e:
...     print(e.errors()[0]["loc"], e.errors()[0]["type"])
('shifted', 'by') unexpected_keyword_argument
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass as validated

strategy = validated(frozen=True, kw_only=True, config=ConfigDict(extra="forbid"))
"""Decorator of a strategy class: frozen, keyword-only, unknown parameters rejected."""


def _named(value: Any) -> Any:
    """A bare name stands for the strategy with its defaults."""
    return {"name": value} if isinstance(value, str) else value


def choice(classes: Any) -> Any:
    """The settings type that holds one built strategy of the union `classes`, picked by
    its name."""
    return Annotated[classes, Field(discriminator="name"), BeforeValidator(_named)]
