"""The volume verbs of a domain (create, list, extend, update, measure,
reduce, delete) and prepare/teardown, each under its resource locks, and the
watches that extend a thin volume ahead of the VM writing it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from storage import commands, qemuimg
from storage.domains import merge
from storage.domains.base import (
    Domain,
    Progress,
    VmAccess,
    VolumeSpec,
    check_generation,
    volume_info,
)
from storage.domains.prepared import PURPOSES, PreparedVolumes, prepared_key
from storage.domains.registry import DomainRegistry
from storage.domains.writers import (
    Link,
    Switch,
    SwitchUncertain,
    WriterWatch,
    layer_nodes,
    switch_writers,
    switched,
)
from storage.errors import (
    BackupDomainRestricted,
    GenerationMismatch,
    HostAgentError,
    HostStateError,
    InvalidParameter,
    PrepareIllegalVolumeError,
    VolumeDoesNotExist,
    VolumeIsBusy,
    VolumeNonWritable,
)
from storage.locks import SHARED, LockManager, request
from storage.metadata import LEGAL, READY, VolumeFormat, VolumeMetadata
from storage.thin import ThinPolicy

log = logging.getLogger("storage.domains")


class VolumeOps:
    def __init__(self, registry: DomainRegistry, prepared: PreparedVolumes,
                 locks: LockManager, *, io_timeout: float = 30.0,
                 vm_access: VmAccess | None = None, thin: ThinPolicy | None = None,
                 runner: commands.Runner = commands.run) -> None:
        self.registry = registry
        self.prepared = prepared
        self.locks = locks
        self.io_timeout = io_timeout
        # the group (qemu's) a prepare gives the volumes to; None: root only
        self.vm_access = vm_access
        self.thin = thin or ThinPolicy()
        self.runner = runner
        # Told of every extension of a thin volume (extendVolume, the writers
        # the agent watches): (params, error); the agent sends them as
        # volume.extended / volume.extendFailed and counts them.
        self.on_extend: Callable[[dict[str, Any], HostAgentError | None], None] = (
            lambda params, error: None)
        # "sd/img/vol" -> the watch extending the volume ahead of its writer
        self._watches: dict[str, WriterWatch] = {}
        # a writer's monitor socket -> the one connection its disks' watches share
        self._links: dict[str, Link] = {}

    async def start(self) -> None:
        """VMs outlive the agent: their writers are watched again."""
        for key, writer in self.prepared.writers.items():
            if key in self.prepared.counts:
                self._watch_writer(key, writer)

    async def stop(self) -> None:
        for watch in self._watches.values():
            await watch.stop()
        self._watches.clear()
        self._links.clear()

    # ---- volumes ---------------------------------------------------------------------------

    async def create_volume(self, sd: str, spec: VolumeSpec,
                            progress: Progress) -> dict[str, Any]:
        async with self.locks.volumes(sd, spec.img, spec.vol, parent=spec.parent):
            entry = await self.registry.entry(sd)
            self.registry.check_writable(entry)
            # a layer carries its parent's dirty bitmaps (VDSM's addBitmaps)
            fill = merge.bitmaps_fill(self, entry.domain) if spec.parent else None
            md = await entry.domain.create_volume(spec, progress, fill=fill)
            domain = entry.domain
            apparent, true = await domain.volume_sizes(md.image, md.uuid)
            return volume_info(md, apparent, true)

    async def volume_info(self, sd: str, img: str, vol: str) -> dict[str, Any]:
        domain = await self.registry.domain(sd)
        return await domain.volume_info(img, vol)

    async def volumes_list(self, sd: str, img: str | None) -> list[str]:
        domain = await self.registry.domain(sd)
        # what other hosts made or removed since this host cached it counts
        domain.forget_cache()
        if img is not None:
            return [v.uuid for v in await domain.image_volumes(img, cached=True)]
        return [v.uuid for v in await domain.all_volumes(cached=True)]

    async def images_list(self, sd: str) -> list[str]:
        domain = await self.registry.domain(sd)
        domain.forget_cache()
        ids = await domain.image_ids()
        # an image that holds only half-made volumes whose removal is retried
        # is gone for the engine (its job failed and said so)
        gone = set()
        for img in {md.image for md in domain.pending_discards.values()} & set(ids):
            with contextlib.suppress(HostAgentError):
                if not await domain.image_volumes(img, cached=True):
                    gone.add(img)
        return [img for img in ids if img not in gone]

    async def extend_volume(self, sd: str, img: str, vol: str, new_size: int,
                            generation: int | None = None) -> dict[str, Any]:
        async with self.locks.volumes(sd, img, vol):
            domain = await self.registry.active_domain(sd)
            md = await domain.extend_volume(img, vol, new_size, generation)
            apparent, true = await domain.volume_sizes(img, vol)
            return volume_info(md, apparent, true)

    async def update_volume(self, sd: str, img: str, vol: str, *, description: str | None,
                            legality: str | None,
                            generation: int | None = None) -> dict[str, Any]:
        async with self.locks.volumes(sd, img, vol):
            domain = await self.registry.active_domain(sd)
            md = await domain.update_volume(img, vol, description=description,
                                            legality=legality, generation=generation)
            apparent, true = await domain.volume_sizes(img, vol)
            return volume_info(md, apparent, true)

    async def measure_volume(self, sd: str, img: str, vol: str, fmt: str,
                             collapse: bool = True) -> dict[str, int]:
        """What converting the volume to `fmt` ("raw", "cow") needs (qemu-img
        measure): its chain collapsed, or with collapse=False its own layer
        only. Read-only: locks shared like a copy's source; the chain is
        used (LVs active) only while measured."""
        async with self.locks.hold(request("domain", sd, SHARED),
                                   request("image", f"{sd}/{img}", SHARED)):
            domain = await self.registry.active_domain(sd)
            chain = await domain.chain(img, vol)
            for md in chain:
                if md.legality != LEGAL or md.state != READY:
                    raise PrepareIllegalVolumeError(volUUID=md.uuid)
            top = chain[-1]
            async with self.prepared.using(domain, chain if collapse else [top]):
                m = await qemuimg.measure(path=domain.volume_path(img, vol),
                                          src_fmt=VolumeFormat.of(top.format).qemu,
                                          dst_fmt=VolumeFormat.of(fmt).qemu,
                                          backing=collapse,
                                          block=domain.volumes_are_devices,
                                          timeout=self.io_timeout, runner=self.runner)
        out = {"required": m["required"], "fullyAllocated": m["fully-allocated"]}
        if fmt == "cow":
            out["bitmaps"] = m["bitmaps"]
        return out

    async def extend_allocation(self, sd: str, img: str, vol: str, min_size: int,
                                generation: int | None = None, *,
                                report: bool = True) -> dict[str, Any]:
        """extendVolume. Only the domain (shared) is locked: a VM's extension
        never waits behind a long job on its image; LVM orders lvextends.
        `report=False`: a failure is not told (a watch's retry)."""
        event: dict[str, Any] = {"sdUUID": sd, "imgUUID": img, "volUUID": vol}
        try:
            async with self.locks.hold(request("domain", sd, SHARED)):
                domain = await self.registry.active_domain(sd)
                size, grew = await domain.extend_allocation(img, vol, min_size, generation)
        except HostAgentError as e:
            if report and not isinstance(e, VolumeDoesNotExist | GenerationMismatch |
                                         InvalidParameter):
                self.on_extend({**event, "size": min_size}, e)
            raise
        if grew:
            self.on_extend({**event, "size": size}, None)
        return {"size": size}

    async def reduce_volume(self, sd: str, img: str, vol: str,
                            generation: int | None = None) -> dict[str, Any]:
        """reduceVolume (a job): refused while a VM may write the volume on
        this host (prepared for vm); its chain active for qemu-img check."""
        async with self.locks.volumes(sd, img, vol):
            domain = await self.registry.active_domain(sd)
            if self.prepared.counts.get(prepared_key(sd, img, vol), {}).get("vm"):
                raise VolumeIsBusy(resource=f"volume {vol}",
                                   reason="it is prepared for a VM, which may write it")
            md = await domain.volume(img, vol)
            check_generation(md, generation)
            chain = await domain.chain(img, vol)
            async with self.prepared.using(domain, chain):
                size = await domain.reduce_volume(md)
            return {"size": size}

    async def refresh_volume(self, sd: str, img: str, vol: str) -> dict[str, Any]:
        async with self.locks.hold(request("domain", sd, SHARED)):
            domain = await self.registry.active_domain(sd)
            return {"size": await domain.refresh_volume(img, vol)}

    async def delete_volume(self, sd: str, img: str, vol: str,
                            generation: int | None = None, *, wipe: bool = False) -> None:
        async with self.locks.volumes(sd, img, vol):
            domain = await self.registry.active_domain(sd)
            if prepared_key(sd, img, vol) in self.prepared.counts:
                raise VolumeIsBusy(resource=f"volume {vol}", reason="it is prepared")
            await domain.delete_volume(img, vol, generation, wipe=wipe)
        self.space_freed(sd)

    async def delete_image(self, sd: str, img: str, progress: Progress, *,
                           wipe: bool = False) -> None:
        async with self.locks.volumes(sd, img):
            domain = await self.registry.active_domain(sd)
            if any(k.startswith(f"{sd}/{img}/") for k in self.prepared.counts):
                raise VolumeIsBusy(resource=f"image {img}", reason="volumes are prepared")
            await domain.delete_image(img, progress, wipe=wipe)
        self.space_freed(sd)

    # ---- prepare / teardown -----------------------------------------------------------------

    def _watch_writer(self, key: str, writer: dict[str, str]) -> None:
        sd, img, vol = key.split("/")

        async def current() -> int:
            # (on each connection to the writer) the device takes the size in
            # LVM's metadata: an lvextend killed with an earlier agent may have
            # committed without reloading the device's table, or left it
            # suspended; a write past the old end would fail
            return int((await self.refresh_volume(sd, img, vol))["size"])

        async def extend(min_size: int, *, report: bool = True) -> int:
            return int((await self.extend_allocation(sd, img, vol, min_size,
                                                     report=report))["size"])

        path = writer["qmpSocket"]
        link = self._links.setdefault(path, Link(path))
        self._watches[key] = WriterWatch(key, path, writer["nodeName"], self.thin,
                                         current=current, extend=extend, link=link).start()

    def space_freed(self, sd: str) -> None:
        """Space came back in domain `sd` on this host (a volume deleted, the
        domain extended): its watches failing to extend try again now."""
        for key, watch in self._watches.items():
            if key.startswith(f"{sd}/"):
                watch.wake()

    async def _unwatch_writer(self, key: str) -> None:
        self.prepared.writers.pop(key, None)
        await self._stop_watch(key)

    async def _stop_watch(self, key: str) -> None:
        watch = self._watches.pop(key, None)
        if watch is not None:
            await watch.stop()
            if watch.link.idle:
                self._links.pop(watch.qmp_socket, None)

    # ---- live snapshots: a VM's writers moved onto new layers ------------------------

    def live_writer(self, field: str, sd: str, img: str, vol: str,
                    switch: str | None = None) -> WriterWatch | None:
        """The writer a new layer over this volume must be switched onto by
        the agent (its registered QMP writer), None if nothing or the caller
        switches; 203 for a VM disk with no writer (check_not_written)."""
        watch = self._watches.get(prepared_key(sd, img, vol))
        if switch == "caller" or watch is None:
            self.prepared.check_not_written(field, sd, img, vol, switch)
            return None
        return watch

    async def switch_writers(self, layers: list[tuple[str, Domain, VolumeMetadata,
                                                      WriterWatch]]) -> None:
        """Move VMs' writers onto the new layers (`field`, domain, the new
        layer, the old top's watch) in one transaction; the new top is then
        what is prepared for the VM and watched. On failure the writers stay
        on their old tops and the new layers are released (still there)."""
        if not layers:
            return
        writers, prepared = self.prepared.writers, self.prepared
        chains = [(d, await d.chain(md.image, md.uuid)) for _, d, md, _ in layers]
        news = [prepared_key(d.uuid, md.image, md.uuid) for _, d, md, _ in layers]
        # Recorded first: a restart after a kill asks the writer which side
        # of the transaction it is on (resolve_switches), and an interrupted
        # job's recovery never removes a layer a VM may write.
        for (_, _, md, watch), new in zip(layers, news, strict=True):
            writers[new] = {**writers[watch.name],
                            "nodeName": layer_nodes(md.uuid)[0], "switchedFrom": watch.name}
        prepared.save()
        used: list[tuple[Domain, list[VolumeMetadata]]] = []
        try:
            for domain, chain in chains:
                await prepared.use_volumes(domain, chain)
                used.append((domain, chain))
                if self.vm_access is not None:
                    await domain.grant_access(chain[-1:], self.vm_access)
            await switch_writers([Switch(watch, field, domain.volume_path(md.image, md.uuid),
                                         md.uuid) for field, domain, md, watch in layers])
        except SwitchUncertain:
            # kept in use and recorded as switching (see resolve_switches)
            raise
        except BaseException:
            for domain, chain in used:
                await prepared.release_volumes(domain, chain)
            for new in news:
                writers.pop(new, None)
            prepared.save()
            raise
        for (_, domain, _, watch), new, (_, chain) in zip(layers, news, chains, strict=True):
            await self._switched(watch.name, new)
            with contextlib.suppress(HostAgentError):
                if watch.name not in prepared.counts:
                    await prepared.release_volumes(domain, chain[:-1])
        prepared.save()

    def _move_vm(self, old: str, new: str) -> None:
        """The VM's prepare count goes from the old top to the new one."""
        counts = self.prepared.counts.get(old, {})
        self.prepared.counts[new] = {"vm": counts.pop("vm", 1)}
        if not counts:
            self.prepared.counts.pop(old, None)

    async def _switched(self, old: str, new: str) -> None:
        """The VM writes `new` now, not `old`: prepared for vm and watched."""
        self._move_vm(old, new)
        self.prepared.writers[new].pop("switchedFrom", None)
        # watched on the new node first: the writer's connection stays up
        self._watch_writer(new, self.prepared.writers[new])
        await self._unwatch_writer(old)

    async def resolve_switches(self) -> None:
        """Live snapshots a kill cut: the writer says whether it holds the
        new layer. Unknown (the writer not running): both kept, the old one
        watched, the new layer kept by the job's recovery."""
        writers = self.prepared.writers
        changed = False
        for new, writer in list(writers.items()):
            old = writer.get("switchedFrom")
            if old is None:
                continue
            on_new = await switched(writer["qmpSocket"], new.split("/")[2])
            log.warning("Live snapshot cut by a restart: the writer of %s %s", old,
                        {True: f"writes {new}", False: "was not switched",
                         None: "cannot be asked: both layers kept"}[on_new])
            if on_new:
                self._move_vm(old, new)
                writer.pop("switchedFrom")
                writers.pop(old, None)
            elif on_new is False:
                writers.pop(new)
            changed = changed or on_new is not None
        if not changed:
            return      # nothing to write (a full state directory warned each start)
        try:
            self.prepared.save()
        except HostStateError as e:
            # the next start asks the writers again
            log.warning("%s", e.message)

    async def prepare(self, sd: str, img: str, vol: str, purpose: str,
                      writer: dict[str, str] | None = None) -> dict[str, Any]:
        if writer is not None and purpose != "vm":
            raise InvalidParameter(field="writer", reason="only with purpose vm")
        async with self.locks.volumes(sd, img):
            domain = await self.registry.active_domain(sd)
            if purpose == "vm" and domain.md.backup:
                raise BackupDomainRestricted(sdUUID=sd, reason="its volumes cannot be "
                                                               "prepared for a running VM")
            chain = await domain.chain(img, vol)
            for md in chain:
                if md.legality != LEGAL or md.state != READY:
                    raise PrepareIllegalVolumeError(volUUID=md.uuid)
            if purpose == "vm":
                # a VM writing a parent corrupts every volume layered on it
                kids = await domain.children(chain[-1])
                if kids:
                    raise VolumeNonWritable(
                        volUUID=vol, reason=f"it is the parent of {len(kids)} volume(s) "
                                            f"({kids[0].image}/{kids[0].uuid}); only a leaf "
                                            "can be prepared for a VM (read and copy can)")
            key = prepared_key(sd, img, vol)
            if key in self.prepared.counts:
                # Already counted; activating again is harmless (and needed
                # after a reboot deactivated everything).
                await domain.activate_volumes(chain, refresh=True)
            else:
                await self.prepared.use_volumes(domain, chain, refresh=True)
            if self.vm_access is not None:
                try:
                    await domain.grant_access(chain, self.vm_access)
                except BaseException:
                    if key not in self.prepared.counts:
                        # not prepared: its LVs must not stay active, counted
                        await self.prepared.release_volumes(domain, chain)
                    raise
            await self._count(domain, chain, key, purpose, writer)
            return {"path": domain.volume_path(img, vol),
                    "chain": [{"volUUID": m.uuid, "imgUUID": m.image,
                               "path": domain.volume_path(m.image, m.uuid),
                               "format": m.format.lower()} for m in chain]}

    async def _count(self, domain: Domain, chain: list[VolumeMetadata], key: str,
                     purpose: str, writer: dict[str, str] | None) -> None:
        """One more prepare of `key` for `purpose` (with its VM's writer),
        recorded. If the record cannot be written (HostStateError: the state
        directory full) nothing is counted, and a chain that was not
        prepared is released."""
        counted = key in self.prepared.counts
        before = dict(self.prepared.counts.get(key, {}))
        self.prepared.counts[key] = {**before, purpose: before.get(purpose, 0) + 1}
        old_writer = self.prepared.writers.get(key)
        if writer is not None and old_writer != writer:
            self.prepared.writers[key] = writer
        try:
            self.prepared.save()
        except HostStateError:
            if counted:
                self.prepared.counts[key] = before
            else:
                del self.prepared.counts[key]
                await self.prepared.release_volumes(domain, chain)
            if old_writer is None:
                self.prepared.writers.pop(key, None)
            else:
                self.prepared.writers[key] = old_writer
            raise
        if writer is not None and old_writer != writer:
            # a VM started again (or another one): the new writer
            await self._stop_watch(key)
            self._watch_writer(key, writer)

    async def teardown(self, sd: str, img: str, vol: str | None) -> None:
        async with self.locks.volumes(sd, img):
            # not self.domain(): a domain whose mount is gone (360) is torn down too
            domain = (await self.registry.entry(sd)).domain
            keys = [k for k in self.prepared.counts
                    if k.startswith(f"{sd}/{img}/") and (vol is None or k.endswith(f"/{vol}"))]
            counts_before = {k: dict(self.prepared.counts[k]) for k in keys}
            writers_before = {k: self.prepared.writers[k] for k in keys
                              if k in self.prepared.writers}
            for key in keys:
                counts = self.prepared.counts[key]
                # one teardown undoes one prepare (the most privileged purpose first)
                for purpose in PURPOSES:
                    if counts.get(purpose):
                        counts[purpose] -= 1
                        if not counts[purpose]:
                            del counts[purpose]
                        break
                if not counts.get("vm"):
                    self.prepared.writers.pop(key, None)
                if not counts:
                    del self.prepared.counts[key]
            try:
                # recorded first: if it cannot be (the state directory
                # full), the volumes stay prepared, as the record says
                self.prepared.save()
            except HostStateError:
                self.prepared.counts.update(counts_before)
                self.prepared.writers.update(writers_before)
                raise
            for key in keys:
                if key not in self.prepared.writers:
                    await self._stop_watch(key)
                if key not in self.prepared.counts:
                    _, _, v = key.split("/")
                    with contextlib.suppress(HostAgentError):
                        await self.prepared.release_volumes(domain, await domain.chain(img, v))
