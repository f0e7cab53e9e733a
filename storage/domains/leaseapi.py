"""What a domain's flows ask of its leases (`Leases`, checked by mypy), and the
null leases of a domain no LeaseManager watches.

`Domain.leases` is typed `Leases`, so the real `DomainLeases` (leasing.py) must
implement every member itself: a method it lacked would be a type error, not a
lease silently granted by an inherited no-op (the null object was its base class
once: it failed open).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from storage.metadata import VolumeMetadata


class Leases(Protocol):
    """The leases one domain's writes take (leasing.py says which and when)."""

    @property
    def io_timeout(self) -> int: ...

    def joined(self) -> bool:
        """True while this host's id is held in the domain's lockspace."""

    async def ensure_writable(self) -> None:
        """661 unless this host may write the domain (its id joined)."""

    def metadata(self) -> AbstractAsyncContextManager[None]:
        """The domain lease around a change of domain (or VG) metadata."""

    def volume(self, md: VolumeMetadata) -> AbstractAsyncContextManager[None]:
        """The volume's lease around a block; 651 if another host holds it."""

    async def hold(self, md: VolumeMetadata) -> None:
        """Take the volume's lease until `drop`."""

    async def drop(self, md: VolumeMetadata) -> None:
        """Release a lease taken by `hold`."""

    def check(self, md: VolumeMetadata) -> None:
        """LeaseLost if the held lease of `md` is gone."""

    async def busy(self, md: VolumeMetadata) -> bool:
        """True while another host or job holds the volume's lease."""

    async def leave(self) -> None:
        """Leave the lockspace."""

    def status(self) -> dict[str, Any]:
        """This host's id in the lockspace, for getStorageDomainStats."""


class Unleased:
    """The leases of a domain no LeaseManager watches (a Domain used on its own:
    unit tests, tools). Every lease is granted at once. Not a base class."""

    io_timeout = 10

    def joined(self) -> bool:
        return True

    async def ensure_writable(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def metadata(self) -> AsyncIterator[None]:
        yield

    @contextlib.asynccontextmanager
    async def volume(self, md: VolumeMetadata) -> AsyncIterator[None]:
        yield

    async def hold(self, md: VolumeMetadata) -> None:
        return None

    async def drop(self, md: VolumeMetadata) -> None:
        return None

    def check(self, md: VolumeMetadata) -> None:
        return None

    async def busy(self, md: VolumeMetadata) -> bool:
        return False

    async def leave(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"hostId": None, "state": "unleased", "backend": None}


UNLEASED: Leases = Unleased()
