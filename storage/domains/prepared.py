"""Which volumes are prepared on this host, for which purposes, and how many
users need each volume usable (active) here. The host's own state, kept
across restarts in state_dir/prepared.json and writers.json: it guards
disconnects, deactivation and removal of volumes in use."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from storage.domains.base import Domain
from storage.errors import HostAgentError, VolumeIsBusy
from storage.fileio import read_state, record_state, str_map
from storage.metadata import VolumeMetadata

log = logging.getLogger("storage.domains")

PURPOSES = ("vm", "read", "copy")


def prepared_key(sd: str, img: str, vol: str) -> str:
    return f"{sd}/{img}/{vol}"


def _keyed(record: dict[str, object]) -> bool:
    """Whether every key of a record is a prepared_key."""
    return all(k.count("/") == 2 for k in record)


class PreparedVolumes:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        # "sd/img/vol" -> {purpose: count}
        self.counts: dict[str, dict[str, int]] = {}
        # "sd/img/vol" -> the writer prepareImage named ({qmpSocket, nodeName})
        self.writers: dict[str, dict[str, str]] = {}
        # "sd/vol" -> how many users (prepared chains, running copies) need the
        # volume active: a template's LV stays active while any clone needs it.
        self.active_refs: dict[str, int] = {}
        self._activation: dict[str, asyncio.Lock] = {}
        # domains whose prepared volumes are in active_refs (count())
        self._counted: set[str] = set()

    # ---- host state --------------------------------------------------------------

    def load(self) -> None:
        """StateDamaged if a record is not what save() writes."""
        def counts(v: object) -> bool:
            return str_map(v, lambda n: type(n) is int and n > 0)

        def writer(v: object) -> bool:
            return str_map(v, lambda s: isinstance(s, str))
        self.counts = read_state(self.state_dir / "prepared.json", "the prepared volumes",
                                 lambda r: str_map(r, counts) and _keyed(r), {})
        self.writers = read_state(self.state_dir / "writers.json", "the prepared volumes' writers",
                                  lambda r: str_map(r, writer) and _keyed(r), {})

    def save(self) -> None:
        """HostStateError if a record cannot be written (the state directory full)."""
        for name, data in (("prepared.json", self.counts), ("writers.json", self.writers)):
            record_state(self.state_dir / name, json.dumps(data, sort_keys=True).encode(),
                         "the prepared volumes")

    async def count(self, lookup: Callable[[str], Domain | None]) -> None:
        """What prepared.json says is in use keeps its volumes active;
        lookup(sd) is the domain of that id known here, or None. Each
        domain is counted once: at the start, or when it is found after it
        (its storage late), whichever comes first."""
        found: set[str] = set()
        for key in list(self.counts):
            sd, img, vol = key.split("/")
            domain = lookup(sd)
            if domain is None or sd in self._counted:
                continue
            found.add(sd)
            try:
                chain = await domain.chain(img, vol)
            except HostAgentError as e:
                log.warning("Prepared volume %s: %s", key, e.message)
                continue
            for md in chain:
                ref = f"{sd}/{md.uuid}"
                self.active_refs[ref] = self.active_refs.get(ref, 0) + 1
        self._counted |= found

    # ---- questions ---------------------------------------------------------------

    def on(self, sd: str, purpose: str | None = None) -> bool:
        """Whether any volume of the domain is prepared (for that purpose)."""
        return any(k.startswith(f"{sd}/") and (purpose is None or v.get(purpose))
                   for k, v in self.counts.items())

    def is_prepared(self, sd: str, img: str, purpose: str | None = None) -> bool:
        return any(k.startswith(f"{sd}/{img}/") and (purpose is None or v.get(purpose))
                   for k, v in self.counts.items())

    def check_not_written(self, field: str, sd: str, img: str, vol: str,
                          switch: str | None = None) -> None:
        """A new layer on a disk a VM may write (prepared for vm on this
        host) is consistent only if the VM is switched onto it: by the
        agent (a registered QMP writer: VolumeOps.live_writer) or by the
        caller ("switch": "caller"). Otherwise refused, rather than a layer
        the VM does not use or a copy of a layer it still writes."""
        if switch == "caller" or not self.is_prepared(sd, img, "vm"):
            return
        raise VolumeIsBusy(resource=f"{field} (volume {vol} of image {img} on {sd})",
                           reason="prepared for a VM with no writer registered; say "
                                  "\"switch\": \"caller\" if the VM manager switches the "
                                  "VM onto the new layer itself")

    def switching(self, sd: str, img: str, vol: str) -> bool:
        """A layer a VM writes or may write (a live snapshot cut by a crash)."""
        key = prepared_key(sd, img, vol)
        return key in self.writers or bool(self.counts.get(key, {}).get("vm"))

    # ---- users of volumes ---------------------------------------------------------

    async def use_volumes(self, domain: Domain, chain: list[VolumeMetadata], *,
                          refresh: bool = False) -> None:
        """Make volumes usable on this host (block: activate their LVs),
        counting users, so one user's release leaves them active for others.
        `refresh`: those active already are reloaded (see activate_volumes)."""
        async with self._activation.setdefault(domain.uuid, asyncio.Lock()):
            await domain.activate_volumes(chain, refresh=refresh)
            for md in chain:
                ref = f"{domain.uuid}/{md.uuid}"
                self.active_refs[ref] = self.active_refs.get(ref, 0) + 1

    async def release_volumes(self, domain: Domain, chain: list[VolumeMetadata]) -> None:
        """Undo one use_volumes; volumes nobody uses any more are deactivated."""
        async with self._activation.setdefault(domain.uuid, asyncio.Lock()):
            unused = []
            for md in chain:
                ref = f"{domain.uuid}/{md.uuid}"
                left = self.active_refs.get(ref, 0) - 1
                if left <= 0:
                    self.active_refs.pop(ref, None)
                    unused.append(md)
                else:
                    self.active_refs[ref] = left
            with contextlib.suppress(HostAgentError):
                await domain.deactivate_volumes(unused)

    @contextlib.asynccontextmanager
    async def using(self, domain: Domain, chain: list[VolumeMetadata]) -> AsyncIterator[None]:
        await self.use_volumes(domain, chain)
        try:
            yield
        finally:
            await self.release_volumes(domain, chain)
