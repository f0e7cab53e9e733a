"""The OpenRPC document rpc.discover serves: valid under the official OpenRPC
meta-schema (committed as test data, tests/data/openrpc/SOURCE.md), each
method's errors declared in the standard `errors` field, and every param and
result schema a valid JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

import rpc.verbs  # noqa: F401 - registers the verbs in TABLE
from rpc.dispatch import openrpc_document
from rpc.openrpc import VERB_ERRORS
from rpc.table import TABLE
from storage.errors import error_table

DATA = Path(__file__).parent.parent / "data" / "openrpc"
META = json.loads((DATA / "openrpc-meta-schema-1.14.9.json").read_text())
JSON_SCHEMA_META = json.loads((DATA / "json-schema-tools-meta-schema-1.8.0.json").read_text())
DOC = openrpc_document(TABLE.all())
METHODS = {m["name"]: m for m in DOC["methods"]}


def meta_validator() -> jsonschema.Draft7Validator:
    # Both meta-schemas are draft-07; the OpenRPC one refers to the JSON
    # Schema one by its $id: resolved to the committed copy, offline.
    jst = Resource.from_contents(JSON_SCHEMA_META, default_specification=DRAFT7)
    registry: Registry[Any] = Registry().with_resources([
        ("https://meta.json-schema.tools", jst), ("https://meta.json-schema.tools/", jst)])
    return jsonschema.Draft7Validator(META, registry=registry)


def test_document_is_valid_openrpc() -> None:
    assert len(METHODS) > 30
    errs = sorted(meta_validator().iter_errors(DOC), key=lambda e: list(e.absolute_path))
    assert not errs, [f"{list(e.absolute_path)}: {e.message}" for e in errs[:10]]


def test_meta_schema_catches_a_bad_error_object() -> None:
    """The check can fail: an error object without its message is refused."""
    bad = json.loads(json.dumps(DOC))
    del bad["methods"][0]["errors"][0]["message"]
    assert not meta_validator().is_valid(bad)
    # and a param's schema is checked too (through the JSON Schema meta-schema)
    bad = json.loads(json.dumps(DOC))
    bad["methods"][0]["params"][0]["schema"]["type"] = 5
    assert not meta_validator().is_valid(bad)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_declares_its_errors_once(name: str) -> None:
    errors = METHODS[name]["errors"]
    codes = [e["code"] for e in errors]
    assert 100 in codes and len(codes) == len(set(codes)), codes
    if METHODS[name]["params"]:
        assert -32602 in codes
    table = {e["code"]: e["name"] for e in error_table()}
    for e in errors:
        if e["code"] > 0:
            assert table[e["code"]] == e["data"]["name"], e


def test_fencing_verbs_declare_911_and_generation() -> None:
    for name in ("extendVolumeSize", "deleteVolume"):
        assert 911 in [e["code"] for e in METHODS[name]["errors"]], name
        [gen] = [p for p in METHODS[name]["params"] if p["name"] == "generation"]
        assert gen["required"] is False and gen["schema"]["type"] == "integer"


def test_declared_verbs_exist() -> None:
    assert set(VERB_ERRORS) <= set(TABLE.all()), set(VERB_ERRORS) - set(TABLE.all())


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("validator", [jsonschema.Draft7Validator,
                                       jsonschema.Draft202012Validator])
def test_param_and_result_schemas_are_valid_json_schema(
        name: str, validator: type[jsonschema.protocols.Validator]) -> None:
    method = METHODS[name]
    schemas = [p["schema"] for p in method["params"]] + [method["result"]["schema"]]
    for s in schemas:
        validator.check_schema(s)


def test_strict_check_can_fail() -> None:
    with pytest.raises(jsonschema.SchemaError):
        jsonschema.Draft202012Validator.check_schema({"type": "integer", "minimum": "0"})
