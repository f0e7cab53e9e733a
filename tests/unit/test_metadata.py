import pytest

from storage.metadata import (
    BLANK_UUID,
    DomainMetadata,
    MetadataError,
    VolumeMetadata,
    decode,
    encode,
)

U1 = "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b"
U2 = "6f1c2d1e-5a4b-4c3d-9e8f-0a1b2c3d4e5f"


def vol(**kw):
    base = dict(domain=U1, image=U2, uuid=U1, parent=BLANK_UUID, format="COW",
                allocation="SPARSE", voltype="LEAF", capacity=1 << 30, legality="ILLEGAL",
                description="a=b c", ctime=1700000000)
    base.update(kw)
    return VolumeMetadata(**base)


def test_round_trip():
    v = vol()
    data = v.encode()
    assert data.endswith(b"EOF\n") and b"CAP=1073741824\n" in data
    assert VolumeMetadata.decode(data) == v
    d = DomainMetadata(uuid=U1, name="my domain", dom_type="posixfs", dom_class="data",
                       backup=True, created=1)
    assert DomainMetadata.decode(d.encode()) == d


def test_padding_after_eof_is_ignored():
    v = vol()
    assert VolumeMetadata.decode(v.encode() + b"\0" * 4000) == v


@pytest.mark.parametrize("mangle", [
    lambda b: b.replace(b"LEGALITY=ILLEGAL", b"LEGALITY=LEGAL"),  # checksum no longer matches
    lambda b: b[: len(b) // 2],                                    # torn write
    lambda b: b"\0" * 512,                                         # blank slot
    lambda b: b.replace(b"EOF\n", b""),
])
def test_damaged_metadata_is_refused(mangle):
    with pytest.raises(MetadataError):
        VolumeMetadata.decode(mangle(vol().encode()))


def test_missing_key_is_refused():
    with pytest.raises(MetadataError, match="missing PUUID"):
        VolumeMetadata.from_values({k: "1" for k in ("DOMAIN", "IMAGE", "VOLUME")})


def test_values_must_be_single_lines():
    with pytest.raises(ValueError, match="DESCRIPTION has a line break"):
        encode({"DESCRIPTION": "two\nlines"})
    assert decode(encode({"A": "x=y"})) == {"A": "x=y"}
