"""Identifiers as they appear on storage."""

import re

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def is_uuid(name: str) -> bool:
    return bool(UUID_RE.match(name))
