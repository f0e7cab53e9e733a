"""Parameter schemas, declared once: they validate every call and they are
what rpc.discover serves (as JSON Schema inside an OpenRPC document).

A failed check raises InvalidParams naming the field by its path
(`src.sdUUID`, `connectionParams[1].port`) and saying why; the edge answers
it with -32602.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# \Z, not $: "$" also matches before a trailing newline, and a UUID ending in
# "\n" would become a file name.
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# The same for JSON Schema (ECMA regex, whose "$" is an end of input).
UUID_PATTERN = UUID_RE.pattern.replace("\\Z", "$")
# Characters that must never reach a command line, a path or a metadata line
# from a request: C0 and C1 controls, and the Unicode line and paragraph
# separators (str.splitlines() breaks lines at U+0085, U+2028 and U+2029 too).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class InvalidParams(Exception):
    """A parameter is missing, of the wrong type or out of range (-32602)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"Invalid params: {field}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": -32602, "message": str(self),
                "data": {"name": "InvalidParams", "field": self.field, "reason": self.reason}}


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _encodable(value: str) -> bool:
    # JSON lets "\ud800" through as a lone surrogate: Python holds it, but it
    # cannot be written to a file, a path or a command line.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Type:
    """A parameter type: validates (and may normalize) a value."""

    description = ""

    def validate(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def json_schema(self) -> dict[str, Any]:
        raise NotImplementedError


class Any_(Type):
    def validate(self, value: Any, path: str) -> Any:
        return value

    def json_schema(self) -> dict[str, Any]:
        return {}


class Bool(Type):
    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            raise InvalidParams(path, f"expected boolean, got {_typename(value)}")
        return value

    def json_schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass
class Int(Type):
    minimum: int | None = None
    maximum: int | None = None
    multiple_of: int | None = None

    def validate(self, value: Any, path: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParams(path, f"expected integer, got {_typename(value)}")
        if self.minimum is not None and value < self.minimum:
            raise InvalidParams(path, f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidParams(path, f"must be at most {self.maximum}")
        if self.multiple_of and value % self.multiple_of:
            raise InvalidParams(path, f"must be a multiple of {self.multiple_of}")
        return value

    def json_schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.multiple_of:
            s["multipleOf"] = self.multiple_of
        return s


@dataclass
class Number(Type):
    minimum: float | None = None
    maximum: float | None = None

    def validate(self, value: Any, path: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParams(path, f"expected number, got {_typename(value)}")
        if not math.isfinite(value):
            raise InvalidParams(path, "must be a finite number")
        if self.minimum is not None and value < self.minimum:
            raise InvalidParams(path, f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidParams(path, f"must be at most {self.maximum}")
        return value

    def json_schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        return s


@dataclass
class Str(Type):
    """A string. By default it must be non-empty and free of control
    characters; `safe_arg` also refuses a leading '-' (it reaches a command
    line)."""

    min_len: int = 1
    max_len: int = 4096
    pattern: str | None = None
    pattern_doc: str = ""
    safe_arg: bool = False
    allow_control: bool = False

    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise InvalidParams(path, f"expected string, got {_typename(value)}")
        if len(value) < self.min_len:
            raise InvalidParams(path, "must not be empty" if self.min_len == 1
                                else f"must be at least {self.min_len} characters")
        if len(value) > self.max_len:
            raise InvalidParams(path, f"must be at most {self.max_len} characters")
        if not _encodable(value):
            raise InvalidParams(path, "must be valid Unicode (no lone surrogates)")
        if not self.allow_control and _CONTROL.search(value):
            raise InvalidParams(path, "must not contain control characters (newline, NUL, ...)")
        if self.safe_arg and value.startswith("-"):
            raise InvalidParams(path, "must not start with '-'")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise InvalidParams(path, self.pattern_doc or f"must match {self.pattern}")
        return value

    def json_schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "minLength": self.min_len,
                             "maxLength": self.max_len}
        if self.pattern is not None:
            s["pattern"] = f"^(?:{self.pattern})$"
        return s


class UUID(Type):
    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise InvalidParams(path, f"expected UUID string, got {_typename(value)}")
        if not UUID_RE.match(value):
            raise InvalidParams(path, "not a canonical lowercase UUID")
        return value

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "format": "uuid", "pattern": UUID_PATTERN}


@dataclass
class Enum(Type):
    values: Sequence[str]

    def validate(self, value: Any, path: str) -> Any:
        if value not in self.values or not isinstance(value, str):
            raise InvalidParams(path, f"must be one of {', '.join(self.values)}")
        return value

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.values)}


@dataclass
class Field:
    name: str
    type: Type
    required: bool = True
    default: Any = None
    description: str = ""
    # Masked in logs and job records (passwords).
    secret: bool = False


@dataclass
class Object(Type):
    fields: Sequence[Field]
    # Extra keys are refused by default: a typo must not be silently ignored.
    extra: bool = False
    # Whole-object checks after the fields, e.g. "one of a or b".
    check: Callable[[dict[str, Any], str], None] | None = None

    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise InvalidParams(path or "params", f"expected object, got {_typename(value)}")
        return validate_fields(self.fields, value, path, extra=self.extra, check=self.check)

    def json_schema(self) -> dict[str, Any]:
        return {"type": "object",
                "properties": {f.name: field_schema(f) for f in self.fields},
                "required": [f.name for f in self.fields if f.required],
                "additionalProperties": self.extra}


@dataclass
class List(Type):
    item: Type
    min_items: int = 0
    max_items: int = 1000

    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise InvalidParams(path, f"expected array, got {_typename(value)}")
        if len(value) < self.min_items:
            raise InvalidParams(path, f"must have at least {self.min_items} item(s)")
        if len(value) > self.max_items:
            raise InvalidParams(path, f"must have at most {self.max_items} items")
        return [self.item.validate(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def json_schema(self) -> dict[str, Any]:
        return {"type": "array", "items": self.item.json_schema(), "minItems": self.min_items,
                "maxItems": self.max_items}


@dataclass
class Nullable(Type):
    inner: Type

    def validate(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.validate(value, path)

    def json_schema(self) -> dict[str, Any]:
        return {"oneOf": [self.inner.json_schema(), {"type": "null"}]}


@dataclass
class OneOrMany(Type):
    """One object, or a list of them (a flow over several disks)."""
    item: Object
    max_items: int = 256

    def validate(self, value: Any, path: str) -> Any:
        if isinstance(value, list):
            return List(self.item, min_items=1, max_items=self.max_items).validate(value, path)
        if isinstance(value, dict):
            return self.item.validate(value, path)
        raise InvalidParams(path, f"expected object or array, got {_typename(value)}")

    def json_schema(self) -> dict[str, Any]:
        return {"oneOf": [self.item.json_schema(),
                          {"type": "array", "items": self.item.json_schema(), "minItems": 1,
                           "maxItems": self.max_items}]}


def field_schema(f: Field) -> dict[str, Any]:
    s = f.type.json_schema()
    if f.description:
        s = {**s, "description": f.description}
    if not f.required and f.default is not None:
        s = {**s, "default": f.default}
    return s


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def validate_fields(fields: Sequence[Field], values: dict[str, Any], path: str = "", *,
                    extra: bool = False,
                    check: Callable[[dict[str, Any], str], None] | None = None
                    ) -> dict[str, Any]:
    """Validate `values` against `fields`; returns the values with defaults."""
    known = {f.name for f in fields}
    if not extra:
        for name in values:
            if name not in known:
                raise InvalidParams(_join(path, name), "unknown parameter")
    out: dict[str, Any] = {k: v for k, v in values.items() if k not in known}
    for f in fields:
        if f.name in values:
            out[f.name] = f.type.validate(values[f.name], _join(path, f.name))
        elif f.required:
            raise InvalidParams(_join(path, f.name), "missing required parameter")
        else:
            out[f.name] = f.default
    if check is not None:
        check(out, path)
    return out


# Keys masked wherever they appear, however deep (connectionParams[].password).
SECRET_KEYS = frozenset({"password"})


def redact(fields: Sequence[Field], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of values with secret fields masked, at any depth, for logs
    and records."""
    secret = {f.name for f in fields if f.secret} | SECRET_KEYS

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ("********" if k in secret and v is not None else mask(v))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        return value

    result: dict[str, Any] = mask(values)
    return result
