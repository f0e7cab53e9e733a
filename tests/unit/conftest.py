"""Fixtures the unit tests of file domains share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.domains.filedomain import FileDomain
from storage.fileio import IOPool
from storage.metadata import DomainMetadata


@pytest.fixture
def io() -> Iterator[IOPool]:
    pool = IOPool("test", timeout=10)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
async def file_domain(tmp_path: Path, io: IOPool) -> FileDomain:
    """A new, empty localfs domain in tmp_path."""
    md = DomainMetadata(uuid=str(uuid.uuid4()), name="t", dom_type="localfs",
                        dom_class="data", version=5, backup=False)
    return await FileDomain.create(tmp_path, md, io)
