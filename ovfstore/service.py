"""The OVF store of every domain: upload tickets, streamed uploads, reads,
info and the entities described by the stored OVFs.

The store is a volume of the domain created with it and named in the
domain's metadata (Domain.ovf_store). One upload per domain at a time: a
second one is refused at once (651), never queued. A ticket is single use
and expires. A ticket is given only if the domain has room for the tar.
"""

from __future__ import annotations

import errno
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovfstore import ovf
from ovfstore.pipeline import UploadError
from ovfstore.store import Body, Header, OvfStore, read_members, slot_size
from storage.domains import Domain, DomainRegistry
from storage.errors import (
    AcquireLockFailure,
    HostAgentError,
    InvalidParameter,
    LeaseHeld,
    NoSpaceLeftOnDomain,
    OvfStoreError,
    OvfTicketError,
    VolumeDoesNotExist,
)
from storage.locks import LockManager, request
from storage.metadata import LEGAL, READY, VolumeMetadata

log = logging.getLogger("ovfstore")


@dataclass
class Ticket:
    id: str
    sd: str
    size: int
    sha256: str | None
    expires: float            # wall clock, as reported to the engine
    # monotonic: what decides; a step of the wall clock (NTP, an admin)
    # neither ends a ticket early nor keeps one alive
    deadline: float
    used: bool = False


class OvfService:
    def __init__(self, domains: DomainRegistry, locks: LockManager, *, slot_size: int,
                 member_limit: int, ticket_ttl: float) -> None:
        self.domains = domains
        self.locks = locks
        self.slot_size = slot_size
        self.member_limit = member_limit
        self.ticket_ttl = ticket_ttl
        self.tickets: dict[str, Ticket] = {}
        # The port of the OVF data listener once it listens (set by the
        # edge, rpc.ovfdata): upload URLs name it. None: the main port.
        self.data_port: int | None = None
        # Store volumes activated on this host (block domains): they stay
        # active, so concurrent readers and uploads never race a deactivation.
        self._active: set[str] = set()

    async def store_of(self, sd: str) -> tuple[Domain, VolumeMetadata, OvfStore]:
        """The domain's OVF store: the volume its metadata records (never one
        found by disk type, which anyone creating a volume may set)."""
        domain = await self.domains.domain(sd)
        ref = await domain.ovf_store()
        if ref is None:
            raise VolumeDoesNotExist(volUUID="OVF store",
                                     reason=f"domain {sd} has no OVF store")
        md = await domain.volume(*ref)
        if md.legality != LEGAL or md.state != READY:
            raise VolumeDoesNotExist(volUUID=md.uuid,
                                     reason=f"the OVF store of domain {sd} is not LEGAL")
        key = f"{sd}/{md.uuid}"
        if key not in self._active:
            await domain.activate_volumes([md])
            self._active.add(key)
        path = Path(domain.volume_path(md.image, md.uuid))
        return domain, md, OvfStore(path, slot_size(md.capacity), domain.io)

    # ---- upload --------------------------------------------------------------------

    def new_ticket(self, sd: str, size: int, sha256: str | None) -> Ticket:
        self._expire()
        ticket = Ticket(id=secrets.token_urlsafe(24), sd=sd, size=size, sha256=sha256,
                        expires=time.time() + self.ticket_ttl,
                        deadline=time.monotonic() + self.ticket_ttl)
        self.tickets[ticket.id] = ticket
        return ticket

    async def issue(self, sd: str, size: int, sha256: str | None) -> Ticket:
        domain, _, store = await self.store_of(sd)
        store.refuse_if_late()
        limit = store.layout(await store.header())
        if size > limit:
            raise InvalidParameter(field="size", reason=f"over the OVF store limit of "
                                                        f"{limit} bytes")
        await self._check_space(domain, store, size)
        return self.new_ticket(sd, size, sha256)

    @staticmethod
    async def _check_space(domain: Domain, store: OvfStore, size: int) -> None:
        """Refuse an upload the domain has no room for, before it takes any
        (a failed one gives back what it took, but until then other
        writers of the domain would find it full)."""
        need = await store.space_needed(size)
        free = (await domain.space())["free"]
        if need > free:
            raise NoSpaceLeftOnDomain(sdUUID=domain.uuid,
                                      reason=f"the OVF tar needs {need} bytes, {free} free")

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self.tickets.items() if t.deadline < now]:
            del self.tickets[key]

    def take(self, ticket_id: str) -> Ticket:
        """Consume a ticket: it is good for one upload attempt only."""
        ticket = self.tickets.pop(ticket_id, None)
        if ticket is None or ticket.used:
            raise OvfTicketError(reason="unknown, used or expired ticket")
        ticket.used = True
        if ticket.deadline < time.monotonic():
            raise OvfTicketError(reason="the ticket expired")
        return ticket

    async def upload(self, ticket: Ticket, content_length: int | None,
                     body: Body) -> dict[str, Any]:
        if content_length is None:
            raise OvfStoreError(reason="Content-Length is required")
        if content_length != ticket.size:
            raise OvfStoreError(reason=f"Content-Length {content_length} is not the size "
                                       f"{ticket.size} given to uploadOvfTar")
        try:
            async with self.locks.hold(request("ovfstore", ticket.sd), nowait=True):
                domain, md, store = await self.store_of(ticket.sd)
                store.refuse_if_late()
                # again: the domain may have filled since the ticket
                await self._check_space(domain, store, ticket.size)
                # the store volume's lease: hosts sharing the domain upload in turn
                async with domain.leases.volume(md):
                    header, members = await store.receive(body, ticket.size,
                                                          member_limit=self.member_limit,
                                                          sha256=ticket.sha256)
        except LeaseHeld:
            raise LeaseHeld(resource=f"OVF store of {ticket.sd}",
                            reason="another host is uploading to it") from None
        except AcquireLockFailure:
            raise AcquireLockFailure(resource=f"OVF store of {ticket.sd}",
                                     reason="another upload is in progress") from None
        except UploadError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceLeftOnDomain(sdUUID=ticket.sd) from None
            raise OvfStoreError(reason=e.reason) from None
        log.info("OVF store of %s: generation %d, %d bytes, %d members", ticket.sd,
                 header.generation, header.size, len(members))
        return {"generation": header.generation, "size": header.size,
                "sha256": header.sha256}

    # ---- reads -------------------------------------------------------------------------

    async def header(self, sd: str) -> tuple[Header, OvfStore]:
        _, _, store = await self.store_of(sd)
        return await store.header(), store

    async def info(self, sd: str) -> dict[str, Any]:
        header, _ = await self.header(sd)
        return {"generation": header.generation, "size": header.size,
                "sha256": header.sha256, "updated": header.updated or None,
                "entries": header.entries}

    async def entities(self, sd: str) -> list[dict[str, Any]]:
        domain, _, store = await self.store_of(sd)
        header = await store.header()
        members = await domain.io.call(read_members, store.path, store.slot_size, header,
                                       self.member_limit,
                                       timeout=max(domain.io.timeout, 300))
        images = await self._image_locations()
        out = []
        for name, data in members:
            try:
                entity = ovf.parse(name[:-len(".ovf")], data)
            except ovf.OvfError as e:
                log.warning("OVF store of %s: %s", sd, e)
                continue
            out.append({"id": entity.id, "kind": entity.kind, "name": entity.name,
                        "disks": [{**d, "sdUUID": images.get(d["imgUUID"])}
                                  for d in entity.disks]})
        return out

    async def _image_locations(self) -> dict[str, str]:
        """imgUUID -> sdUUID over every domain this host sees."""
        found: dict[str, str] = {}
        for sd in await self.domains.list_domains():
            try:
                for img in await (await self.domains.domain(sd)).image_ids():
                    found.setdefault(img, sd)
            except HostAgentError as e:
                log.warning("Cannot list images of %s: %s", sd, e.message)
        return found
