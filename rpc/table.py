"""The verb table: each verb's name, parameter schema, handler and docs.

Handlers are declared with @TABLE.verb next to their code in rpc/verbs/. A
handler takes the Agent and the validated params as keywords and returns
plain JSON data; it holds no storage logic (it calls one function of
storage/ or ovfstore/).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.config import Config
from rpc.schema import Field, InvalidParams, validate_fields

Handler = Callable[..., Awaitable[Any]]
Check = Callable[[dict[str, Any], str], None]


@dataclass
class Verb:
    name: str
    summary: str
    params: Sequence[Field]
    handler: Handler
    result: dict[str, Any] = field(default_factory=dict)
    # Whole-call checks after the fields (e.g. "connectionId or devices").
    check: Check | None = None
    job: bool = False
    test_only: bool = False
    tags: Sequence[str] = ()

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        return validate_fields(self.params, params, check=self.check)


class VerbTable:
    def __init__(self) -> None:
        self._verbs: dict[str, Verb] = {}

    def verb(self, name: str, summary: str, params: Sequence[Field] = (), *,
             result: dict[str, Any] | None = None, check: Check | None = None,
             job: bool = False, test_only: bool = False,
             tags: Sequence[str] = ()) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if name in self._verbs:
                raise ValueError(f"verb {name} defined twice")
            self._verbs[name] = Verb(name=name, summary=summary, params=list(params),
                                     handler=handler, result=result or {}, check=check,
                                     job=job, test_only=test_only, tags=tags)
            return handler
        return register

    def all(self) -> dict[str, Verb]:
        """Every verb declared, test verbs included, by name."""
        return dict(sorted(self._verbs.items()))

    def enabled(self, config: Config) -> dict[str, Verb]:
        """The verbs this agent serves: test verbs only when configured."""
        return {n: v for n, v in sorted(self._verbs.items())
                if config.debug.test_verbs or not v.test_only}


TABLE = VerbTable()


def one_of(*names: str) -> Check:
    """A check: exactly one of `names` is given (not None)."""
    def check(values: dict[str, Any], path: str) -> None:
        given = [n for n in names if values.get(n) is not None]
        if len(given) != 1:
            raise InvalidParams(names[0] if not given else given[1],
                                f"exactly one of {', '.join(names)} is required")
    return check
