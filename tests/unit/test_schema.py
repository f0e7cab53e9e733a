import pytest

from rpc.schema import (
    UUID,
    Bool,
    Enum,
    Field,
    Int,
    InvalidParams,
    List,
    Nullable,
    Object,
    Str,
    redact,
    validate_fields,
)

U = "8c3f1e56-2c1d-4a3b-9f5e-0123456789ab"

FIELDS = [
    Field("sdUUID", UUID()),
    Field("size", Int(1, multiple_of=512)),
    Field("format", Enum(["raw", "cow"])),
    Field("backup", Bool(), required=False, default=False),
    Field("description", Str(min_len=0), required=False, default=""),
    Field("src", Object([Field("sdUUID", UUID()), Field("volUUID", UUID())]), required=False),
    Field("ports", List(Int(1, 65535)), required=False),
    Field("password", Str(), required=False, secret=True),
    Field("parent", Nullable(UUID()), required=False),
]


def good(**kw):
    return {"sdUUID": U, "size": 1024, "format": "raw", **kw}


def test_valid_with_defaults():
    out = validate_fields(FIELDS, good())
    assert out["backup"] is False and out["description"] == "" and out["src"] is None


@pytest.mark.parametrize("params, field, reason", [
    ({"size": 1024, "format": "raw"}, "sdUUID", "missing"),
    (good(sdUUID="8C3F1E56-2C1D-4A3B-9F5E-0123456789AB"), "sdUUID", "lowercase UUID"),
    (good(sdUUID="not-a-uuid"), "sdUUID", "UUID"),
    (good(sdUUID=5), "sdUUID", "got integer"),
    (good(size="1024"), "size", "expected integer, got string"),
    (good(size=True), "size", "expected integer, got boolean"),
    (good(size=0), "size", "at least 1"),
    (good(size=1000), "size", "multiple of 512"),
    (good(format="qcow2"), "format", "one of raw, cow"),
    (good(backup="yes"), "backup", "expected boolean"),
    (good(bogus=1), "bogus", "unknown parameter"),
    (good(src={"sdUUID": U}), "src.volUUID", "missing"),
    (good(src={"sdUUID": U, "volUUID": "x"}), "src.volUUID", "UUID"),
    (good(src=[]), "src", "expected object"),
    (good(ports=[80, 0]), "ports[1]", "at least 1"),
    (good(description="a\nb"), "description", "control characters"),
    (good(password=""), "password", "empty"),
])
def test_invalid_names_field(params, field, reason):
    with pytest.raises(InvalidParams) as e:
        validate_fields(FIELDS, params)
    assert e.value.field == field
    assert reason in e.value.reason
    d = e.value.to_dict()
    assert d["code"] == -32602 and d["data"]["field"] == field


def test_safe_arg_refuses_option_like_values():
    with pytest.raises(InvalidParams, match="must not start with '-'"):
        Str(safe_arg=True).validate("-oProxyCommand=x", "connection")
    assert Str(safe_arg=True).validate("server:/export", "connection") == "server:/export"


def test_nullable_and_redact():
    assert validate_fields(FIELDS, good(parent=None))["parent"] is None
    assert redact(FIELDS, {"password": "s3cret", "size": 1}) == {"password": "********",
                                                                  "size": 1}
    nested = {"connectionParams": [{"id": "x", "password": "s3cret"}]}
    assert redact(FIELDS, nested) == {"connectionParams": [{"id": "x",
                                                            "password": "********"}]}


def test_json_schema_shape():
    schema = Object(FIELDS).json_schema()
    assert schema["required"] == ["sdUUID", "size", "format"]
    assert schema["properties"]["format"]["enum"] == ["raw", "cow"]
    assert schema["properties"]["backup"]["default"] is False
    assert schema["additionalProperties"] is False
