"""File domains: a directory on a connected file storage (nfs, posixfs, localfs).

    <mount>/<sdUUID>/dom_md/metadata      domain metadata (atomic replace)
    <mount>/<sdUUID>/dom_md/ids, leases   lease areas (hosts sharing the domain)
    <mount>/<sdUUID>/images/<img>/<vol>        volume data (raw or qcow2)
    <mount>/<sdUUID>/images/<img>/<vol>.meta   volume metadata (atomic replace)

Every file operation on the mount goes through the domain's IOPool, so a
hung server costs deadlines, not the event loop. A new domain is built in
`<sdUUID>.creating` and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from storage import commands, mount, qemuimg
from storage.domains.base import Domain, Progress, VmAccess, os_error, read_check
from storage.domains.common import visible, volume_info
from storage.domains.garbage import Census
from storage.errors import (
    FileStorageDomainStaleNFSHandle,
    StorageDomainAlreadyExists,
    StorageDomainFSNotMounted,
    VolumeDoesNotExist,
    VolumeMetadataReadError,
)
from storage.fileio import IOPool, atomic_write, fsync_dir, read_direct
from storage.ids import is_uuid
from storage.leases import (
    FileDomainLeases,
    Geometry,
    Resource,
    create_lease_file,
    init_volume_lease,
)
from storage.metadata import (
    BLANK_UUID,
    DomainMetadata,
    MetadataError,
    VolumeFormat,
    VolumeMetadata,
)

T = TypeVar("T")

log = logging.getLogger("storage.domains.filedomain")

LEASE_AREA_SIZE = 1024 * 1024
LEASE_SUFFIX = ".lease"
META_SUFFIX = ".meta"
REMOVE_PREFIX = "_remove_"
# An image directory changed this recently (ns) is read again on each scan,
# whatever its times say: a second change within the same tick of the
# kernel's coarse clock would leave them as they were (git's "racy" case).
RACY_NS = 1_000_000_000

# An image directory's identity and times: any file made, removed or
# renamed in it (every metadata write is a rename, atomic_write) moves them.
DirStamp = tuple[int, int, int]


async def _io(io: IOPool, root: Path, fn: Callable[..., T], *args: Any,
              timeout: float | None = None, key: str | None = None) -> T:
    """io.call for the domain's file system (`key`: the metadata file it
    writes, IOPool.call's). A stale NFS file handle (the server re-created
    the export or moved it to another file system: every handle the host
    holds is refused, the mount's root too) is VDSM's 384 whatever the step
    that met it, not an error of that step."""
    try:
        return await io.call(fn, *args, timeout=timeout, key=key)
    except OSError as e:
        if e.errno == errno.ESTALE:
            raise FileStorageDomainStaleNFSHandle(path=e.filename or str(root)) from None
        raise


def _lease_orphans(names: list[str]) -> list[str]:
    """The volumes of an image directory's listing that have a lease file
    and no metadata: left by a crash (a volume's metadata is written
    before its lease file, and removed before it)."""
    have = set(names)
    return [n[:-len(LEASE_SUFFIX)] for n in names
            if n.endswith(LEASE_SUFFIX) and f"{n[:-len(LEASE_SUFFIX)]}{META_SUFFIX}" not in have]


def _meta_volume(name: str) -> str | None:
    """The volume whose metadata file `name` is (a UUID with .meta), or None."""
    vol = name[:-len(META_SUFFIX)]
    return vol if name.endswith(META_SUFFIX) and is_uuid(vol) else None


def _volume_names(names: list[str]) -> Iterator[str]:
    """The volumes of an image directory's listing."""
    for n in names:
        if (vol := _meta_volume(n)) is not None:
            yield vol


def _image_dirs(images: Path) -> Iterator[tuple[str, int]]:
    """(image, its directory's fd) for each image directory, opened on the
    images directory's fd; each fd is closed when the next is asked for."""
    try:
        ifd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        for image in sorted(os.listdir(ifd)):
            if not is_uuid(image):
                continue
            try:
                dfd = os.open(image, os.O_RDONLY | os.O_DIRECTORY, dir_fd=ifd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                yield image, dfd
            finally:
                os.close(dfd)
    finally:
        os.close(ifd)


def _read_image(image: str, dfd: int, known: dict[bytes, VolumeMetadata],
                census: Census | None) -> list[tuple[bytes, VolumeMetadata]]:
    """Every volume's metadata in an image directory (its fd), as (bytes,
    metadata); `known` decodes bytes read before; with a census, damaged
    volumes are noted there. Each file is opened by the name as listed: on
    the listing's hot path (every file of an NFS domain at each call) no
    name is built per volume."""
    got = []
    for name in sorted(os.listdir(dfd)):
        vol = _meta_volume(name)
        if vol is None:
            continue
        try:
            data = _read_meta(dfd, name)
            md = known.get(data) or VolumeMetadata.decode(data)
        except FileNotFoundError:
            continue
        except MetadataError as e:
            if census is not None:
                census.damaged.append(f"{image}/{vol}: {e}")
            continue
        got.append((data, md))
    return got


def _read_meta(dir_fd: int, name: str, limit: int = 65536) -> bytes:
    """The first `limit` bytes of a metadata file, as open().read(limit)
    returns them, but on a bare fd: the file's one read ends at its EOF
    marker; a short read without it reads on until EOF or `limit`."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        data = os.read(fd, limit)
        if b"\nEOF\n" in data:
            return data
        chunks = [data]
        while data and (size := sum(map(len, chunks))) < limit:
            data = os.read(fd, limit - size)
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def probe_block_size(directory: Path) -> int:
    """The smallest O_DIRECT write size the file system takes (512 or 4096);
    512 where it has no O_DIRECT at all (tmpfs on older kernels)."""
    path = directory / f".probe-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        for size in (512, 4096):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return 512
                raise
            buf = mmap.mmap(-1, size)
            try:
                os.write(fd, buf)
                return size
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
            finally:
                buf.close()
                os.close(fd)
        return 4096
    finally:
        path.unlink()


class FileDomain(Domain):
    def __init__(self, md: DomainMetadata, root: Path, io: IOPool,
                 runner: commands.Runner = commands.run) -> None:
        super().__init__(md, io)
        self.root = root
        self.runner = runner
        # Set by the manager when the domain lives on a mount (nfs, posixfs):
        # once it is gone, paths under it are the mount point's empty
        # directory, where every volume would look deleted (201).
        self.mountpoint: Path | None = None
        # Each volume's metadata file as the last full scan read it, and what
        # it decoded to: a file whose bytes did not change is not parsed
        # again (the parse was most of a large domain's listing, issue 21).
        # Every file is still read on each scan, so what other hosts wrote
        # counts as before; the cache holds only the files the last full scan
        # saw (one image's scan only looks up).
        self._decoded: dict[bytes, VolumeMetadata] = {}
        # Per image directory, on a domain that is this host's own directory
        # (localfs: no mount, no other host): its stamp when it was last
        # read, and what was read. A directory with the same stamp is not
        # listed nor read again (issue 21: reading every file was 60-70% of
        # a 5,000-volume listing). Not on mounts: NFS caches a directory's
        # attributes for up to acdirmax (60 s), where a listing must see
        # what other hosts wrote at once.
        self._images_read: dict[str, tuple[DirStamp, list[tuple[bytes, VolumeMetadata]]]] = {}
        self.clock_ns: Callable[[], int] = time.time_ns   # a test seam
        # whether the file system takes O_DIRECT (probed once, cache_mode)
        self._direct: bool | None = None

    def check_mounted(self) -> None:
        # mountinfo comes from the kernel: reading it never waits on storage.
        if self.mountpoint is not None and mount.find(self.mountpoint) is None:
            raise StorageDomainFSNotMounted(path=str(self.mountpoint))

    async def cache_mode(self) -> str:
        """qemu-img's cache mode on the domain: "none" (O_DIRECT, the page cache
        bypassed), or "writeback" on a file system without O_DIRECT (tmpfs
        before Linux 6.6); qemu-img flushes before it exits either way."""
        if self._direct is None:
            def probe(path: str) -> bool:
                try:
                    os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
                    return True
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        return False
                    raise
            try:
                self._direct = await self.io.call(probe, str(self.md_path))
            except OSError as e:
                raise os_error(e, self.uuid) from None
        return "none" if self._direct else "writeback"

    def location(self) -> dict[str, Any]:
        return {"path": str(self.root)}

    @property
    def md_path(self) -> Path:
        return self.root / "dom_md" / "metadata"

    @property
    def images(self) -> Path:
        return self.root / "images"

    # ---- creation, discovery ---------------------------------------------------

    @classmethod
    async def create(cls, mount: Path, md: DomainMetadata, io: IOPool,
                     runner: commands.Runner = commands.run) -> FileDomain:
        root = mount / md.uuid
        staging = mount / f"{md.uuid}.creating"

        def build() -> int:
            if root.exists():
                raise StorageDomainAlreadyExists(sdUUID=md.uuid)
            if staging.exists():
                shutil.rmtree(staging)
            (staging / "dom_md").mkdir(parents=True)
            (staging / "images").mkdir()
            block_size = probe_block_size(staging / "dom_md")
            for name in ("ids", "leases"):
                with open(staging / "dom_md" / name, "wb") as f:
                    f.truncate(LEASE_AREA_SIZE)
                    os.fsync(f.fileno())
            return block_size

        block_size = await _io(io, mount, build)
        md.block_size = block_size
        await _io(io, mount, atomic_write, staging / "dom_md" / "metadata", md.encode())

        def publish() -> None:
            os.rename(staging, root)
            fsync_dir(mount)

        await _io(io, mount, publish)
        return cls(md, root, io, runner)

    @classmethod
    async def open(cls, root: Path, io: IOPool,
                   runner: commands.Runner = commands.run) -> FileDomain:
        data = await _io(io, root, read_direct, root / "dom_md" / "metadata", 8192)
        md = DomainMetadata.decode(data)
        if md.uuid != root.name:
            raise MetadataError(f"metadata of {md.uuid} found in {root}")
        return cls(md, root, io, runner)

    @staticmethod
    def candidates(mount: Path) -> list[Path]:
        """Domain directories under a mount (blocking: run it in an IOPool)."""
        try:
            names = os.listdir(mount)
        except FileNotFoundError:
            return []
        return [mount / n for n in names
                if is_uuid(n) and (mount / n / "dom_md" / "metadata").exists()]

    # ---- domain metadata --------------------------------------------------------

    async def write_domain_md(self, md: DomainMetadata) -> None:
        await _io(self.io, self.root, atomic_write, self.md_path, md.encode(),
                  key=str(self.md_path))
        self.md = md

    async def read_domain_md(self) -> DomainMetadata:
        data = await _io(self.io, self.root, read_direct, self.md_path, 8192)
        return DomainMetadata.decode(data)

    # ---- images and volumes -------------------------------------------------------

    async def image_ids(self) -> list[str]:
        def listing() -> list[str]:
            # directories only: a stray file with an image's name is none
            try:
                with os.scandir(self.images) as entries:
                    return sorted(e.name for e in entries if is_uuid(e.name) and e.is_dir())
            except FileNotFoundError:
                return []
        return await _io(self.io, self.root, listing)

    async def volume_ids(self, img: str) -> list[str]:
        def listing() -> list[str]:
            try:
                return sorted(_volume_names(os.listdir(self.images / img)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        return await _io(self.io, self.root, listing)

    async def all_volume_ids(self) -> set[str]:
        """In one trip to the I/O thread. The generic one (volume_ids per
        image) made a thread hand-off per image: a create on a localfs
        domain of 10,000 images took 1.5 s (issue 21, session 9)."""
        def listing() -> set[str]:
            ids: set[str] = set()
            for _, dfd in _image_dirs(self.images):
                ids.update(_volume_names(os.listdir(dfd)))
            return ids
        return await _io(self.io, self.root, listing, timeout=max(self.io.timeout, 120))

    async def has_volume(self, vol: str) -> bool:
        """A stat per image, not a listing (every create asks, twice for a
        snapshot): on NFS 4.2 in the lab guest, 405 images, a stat of each
        image's VOL.meta 22-25 ms against 86-147 for a listing of each."""
        return await self.image_of(vol) is not None

    async def image_of(self, vol: str) -> str | None:
        """In one trip to the I/O thread, a stat per image (the generic one
        listed each image in a trip of its own: a clone's prepare on a
        localfs domain of 5,000 volumes took 5 times its time on an
        empty one)."""
        name = vol + META_SUFFIX

        def find() -> str | None:
            try:
                ifd = os.open(self.images, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                return None
            try:
                for img in sorted(filter(is_uuid, os.listdir(ifd))):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        os.stat(f"{img}/{name}", dir_fd=ifd)
                        return img
            finally:
                os.close(ifd)
            return None
        return await _io(self.io, self.root, find, timeout=max(self.io.timeout, 120))

    async def census(self) -> Census:
        """As scan, in one trip to the I/O thread, but every metadata file
        read afresh (no stamps: garbage collection acts on what storage
        holds now). The generic one (a hand-off per image and per volume)
        made activating a localfs domain of 5,000 volumes take 1.3 s; the
        stamps it leaves spare the first listing after it."""
        census = Census([])
        census.volumes = await self._scan(None, census)
        return census

    async def scan(self, img: str | None = None, *,
                   cached: bool = False) -> list[VolumeMetadata]:
        """All metadata in one executor call: one listing and one read per
        volume, with no event loop round trip in between. Each file is
        opened relative to its image directory's fd and read with a bare
        os.read: no Path or buffered file object per volume (issue 21).
        On a domain of this host's own (_images_read), an image directory
        whose stamp did not change since it was read is not read again."""
        return await self._scan(img, None)

    async def _scan(self, img: str | None, census: Census | None) -> list[VolumeMetadata]:
        """census: every image read (the stamps not trusted), its images and
        damaged volumes noted there."""
        known = self._decoded
        images_read = self._images_read
        trust_stamps = self.mountpoint is None
        Read = list[tuple[bytes, VolumeMetadata]]

        def read_all() -> tuple[Read, dict[str, tuple[DirStamp, Read]]]:
            settled = self.clock_ns() - RACY_NS
            try:
                ifd = os.open(self.images, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                return [], {}
            out: Read = []
            stamps: dict[str, tuple[DirStamp, Read]] = {}
            try:
                images = [img] if img else [n for n in os.listdir(ifd)
                                            if n in images_read or is_uuid(n)]
                for image in sorted(images):
                    # the stamp before the listing: a change while it is read
                    # moves the times past it, and is read again next time
                    try:
                        st = os.stat(image, dir_fd=ifd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                    last = images_read.get(image) if trust_stamps and census is None else None
                    if last is not None and last[0] == stamp:
                        got = last[1]
                    else:
                        try:
                            dfd = os.open(image, os.O_RDONLY | os.O_DIRECTORY, dir_fd=ifd)
                        except (FileNotFoundError, NotADirectoryError):
                            continue
                        try:
                            got = _read_image(image, dfd, known, census)
                        finally:
                            os.close(dfd)
                        if census is not None:
                            census.images.append(image)
                    if trust_stamps and max(st.st_mtime_ns, st.st_ctime_ns) < settled:
                        stamps[image] = (stamp, got)
                    out.extend(got)
            finally:
                os.close(ifd)
            return out, stamps
        read, stamps = await _io(self.io, self.root, read_all,
                                 timeout=max(self.io.timeout, 120))
        if img is None:
            self._decoded = dict(read)
            self._images_read = stamps
        else:
            self._images_read.pop(img, None)
            self._images_read.update(stamps)
        return [md for _, md in read]

    def _meta(self, img: str, vol: str) -> Path:
        return self.images / img / f"{vol}{META_SUFFIX}"

    def _read_md(self, img: str, vol: str) -> bytes:
        try:
            with open(self._meta(img, vol), "rb") as f:
                return f.read(65536)
        except FileNotFoundError:
            raise VolumeDoesNotExist(volUUID=vol) from None

    async def read_volume_md(self, img: str, vol: str) -> VolumeMetadata:
        return VolumeMetadata.decode(await _io(self.io, self.root, self._read_md, img, vol))

    async def volume_info(self, img: str, vol: str) -> dict[str, Any]:
        # The metadata and the file's sizes in one trip to the domain's I/O
        # thread, not two: getVolumeInfo is the busiest read verb, and each
        # trip is a wait on the loop with its objects held (issue 21).
        def read() -> tuple[bytes, tuple[int, int]]:
            return self._read_md(img, vol), self._sizes(img, vol)
        data, (apparent, true) = await _io(self.io, self.root, read)
        try:
            md = VolumeMetadata.decode(data)
        except MetadataError as e:
            raise VolumeMetadataReadError(volUUID=vol, reason=str(e)) from None
        return volume_info(visible(md, img, vol, self.pending_discards), apparent, true)

    async def write_volume_md(self, md: VolumeMetadata,
                              initial_size: int | None = None) -> None:
        path = self._meta(md.image, md.uuid)

        def write() -> None:
            (self.images / md.image).mkdir(exist_ok=True)
            atomic_write(path, md.encode(), 0o660)
        await _io(self.io, self.root, write, key=str(path))

    def volume_path(self, img: str, vol: str) -> str:
        return str(self.images / img / vol)

    async def grant_access(self, vols: list[VolumeMetadata], access: VmAccess) -> None:
        def grant() -> None:
            images = sorted({m.image for m in vols})
            # r-x on the way down: qemu opens backing files by relative path
            for d in (self.root, self.images, *(self.images / i for i in images)):
                _give_group(d, access.gid, lambda mode: mode | 0o050)
            for m in vols:
                _give_group(self.images / m.image / m.uuid, access.gid,
                            lambda _: access.file_mode)
        await _io(self.io, self.root, grant)

    async def create_volume_data(self, md: VolumeMetadata, parent: VolumeMetadata | None,
                                 initial_size: int | None) -> None:
        path = self.volume_path(md.image, md.uuid)
        prealloc = "falloc" if md.allocation == "PREALLOCATED" else None
        if md.format == "RAW":
            await qemuimg.create(path, "raw", md.capacity, preallocation=prealloc,
                                 runner=self.runner)
        else:
            backing = None
            backing_fmt = None
            if parent is not None:
                # Relative, so the chain survives another mount point.
                backing = parent.uuid if parent.image == md.image \
                    else f"../{parent.image}/{parent.uuid}"
                backing_fmt = VolumeFormat.of(parent.format).qemu
            # qemu-img (>= 6.0) preallocates a layer over a backing file only
            # with subclusters, which keep unwritten areas reading the backing
            options = ("extended_l2=on",) if backing and prealloc else ()
            await qemuimg.create(path, "qcow2", md.capacity, backing=backing,
                                 backing_fmt=backing_fmt, preallocation=prealloc,
                                 options=options, runner=self.runner)
        await _io(self.io, self.root, os.chmod, path, 0o660)

    async def remove_volume_data(self, img: str, vol: str) -> None:
        def remove() -> None:
            for p in (self.images / img / vol, self._meta(img, vol)):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        await _io(self.io, self.root, remove)

    async def extend_volume_data(self, md: VolumeMetadata, new_size: int) -> None:
        path = self.volume_path(md.image, md.uuid)
        if md.format == "RAW":
            prealloc = "falloc" if md.allocation == "PREALLOCATED" else None
            await qemuimg.resize(path, new_size, fmt="raw", preallocation=prealloc,
                                 runner=self.runner)
        else:
            await qemuimg.resize(path, new_size, fmt="qcow2", runner=self.runner)

    async def open_volume_file(self, md: VolumeMetadata, size: int) -> int:
        # sparse: the room costs no space until written
        path = self.volume_path(md.image, md.uuid)

        def grow() -> int:
            if os.stat(path).st_size < size:
                os.truncate(path, size)
            return os.stat(path).st_size

        return await self.io.call(grow)

    async def close_volume_file(self, md: VolumeMetadata, end: int) -> None:
        path = self.volume_path(md.image, md.uuid)

        def trim() -> None:
            if os.stat(path).st_size > end:
                os.truncate(path, end)

        await self.io.call(trim)

    def _sizes(self, img: str, vol: str) -> tuple[int, int]:
        try:
            st = os.stat(self.images / img / vol)
        except FileNotFoundError:
            return 0, 0
        return st.st_size, st.st_blocks * 512

    async def volume_sizes(self, img: str, vol: str) -> tuple[int, int]:
        return await _io(self.io, self.root, self._sizes, img, vol)

    async def activate_volumes(self, vols: list[VolumeMetadata], *,
                               refresh: bool = False) -> None:
        return None

    async def deactivate_volumes(self, vols: list[VolumeMetadata]) -> None:
        return None

    async def space(self) -> dict[str, int]:
        st = await _io(self.io, self.root, os.statvfs, self.root)
        capacity = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return {"capacity": capacity, "free": free, "used": capacity - free}

    async def remove_image_dir(self, img: str) -> None:
        # a lease file whose volume has no metadata is left from a crash,
        # unless its lease is held (a removal under way): that one stays,
        # and so does the directory, for the collection to finish
        await self._collect_orphan_leases(img)

        def remove() -> None:
            try:
                (self.images / img).rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
        await _io(self.io, self.root, remove)

    async def remove_image_volumes(self, img: str, vols: list[VolumeMetadata],
                                   progress: Progress) -> None:
        """One rename takes the whole image away at once (for every host);
        what follows only frees space, and start-up finishes it after a crash."""
        doomed = self.images / f"{REMOVE_PREFIX}{img}"

        def rename() -> None:
            os.rename(self.images / img, doomed)
            fsync_dir(self.images)

        await _io(self.io, self.root, rename)
        progress(50)

    async def purge_removed_image(self, img: str, progress: Progress) -> None:
        # after the volumes' leases are released: no lease file is open in it
        doomed = self.images / f"{REMOVE_PREFIX}{img}"
        await _io(self.io, self.root, shutil.rmtree, doomed, True,
                  timeout=max(self.io.timeout, 600))
        progress(100)

    async def remove_volume_lease(self, img: str, vol: str) -> None:
        def remove() -> None:
            (self.images / img / f"{vol}.lease").unlink(missing_ok=True)
        await _io(self.io, self.root, remove)

    async def _collect_garbage(self) -> dict[str, list[str]]:
        Debris = tuple[list[Path], list[tuple[str, str]]]

        def debris() -> Debris:
            """Images being removed, temp files of interrupted atomic
            writes, and orphaned lease files: one listing of each image."""
            try:
                names = os.listdir(self.images)
            except FileNotFoundError:
                return [], []
            found = [self.images / n for n in names
                     if n.startswith(REMOVE_PREFIX) or n.startswith(".")]
            orphans = []
            for img, dfd in _image_dirs(self.images):
                listing = os.listdir(dfd)
                found += [self.images / img / f for f in listing
                          if f.startswith(".") and f.endswith(".tmp")]
                orphans += [(img, vol) for vol in _lease_orphans(listing)]
            return found, orphans

        def remove(path: Path) -> None:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        leftovers, lease_files = await _io(self.io, self.root, debris)
        for path in leftovers:
            await _io(self.io, self.root, remove, path, timeout=max(self.io.timeout, 600))
        orphans = await self._remove_orphan_leases(lease_files)
        report = await super()._collect_garbage()
        report["removed"] += [p.name for p in leftovers] + orphans
        return report

    async def _collect_orphan_leases(self, img: str) -> list[str]:
        """Lease files of image `img` whose volume has no metadata (see
        _remove_orphan_leases)."""
        def orphans() -> list[tuple[str, str]]:
            try:
                return [(img, vol) for vol in _lease_orphans(os.listdir(self.images / img))]
            except FileNotFoundError:
                return []         # removed meanwhile (by another host)
        return await self._remove_orphan_leases(await _io(self.io, self.root, orphans))

    async def _remove_orphan_leases(self, found: list[tuple[str, str]]) -> list[str]:
        """Remove these (image, volume) lease files with no metadata beside
        them: a removal writes REMOVING, removes the data and metadata under
        the volume's lease, then (released) its lease file; a crash between
        the last two leaves the lease file, which the metadata-led collection
        never finds. One that some host or job still holds is a removal
        under way: left."""
        removed = []
        for img, vol in found:
            # what the lease API asks of a volume: its ids (the rest is gone)
            gone = VolumeMetadata(domain=self.uuid, image=img, uuid=vol, parent=BLANK_UUID,
                                  format="RAW", allocation="SPARSE", voltype="LEAF",
                                  capacity=0, legality="ILLEGAL", state="REMOVING")
            if await self.leases.busy(gone):
                continue
            await self.remove_volume_lease(img, vol)
            removed.append(f"{img}/{vol}{LEASE_SUFFIX}")
        return removed

    async def remove_all(self) -> None:
        doomed = self.root.parent / f"{REMOVE_PREFIX}{self.uuid}"

        def remove() -> None:
            # The rename makes the domain vanish at once for every host; the
            # slow removal after it can be finished by anyone who finds it.
            if self.root.exists():
                os.rename(self.root, doomed)
                fsync_dir(self.root.parent)
            shutil.rmtree(doomed, ignore_errors=True)
        await _io(self.io, self.root, remove, timeout=max(self.io.timeout, 600))

    async def health_check(self, timeout: float) -> None:
        await read_check(self.runner, self.uuid, str(self.md_path), timeout,
                         buffered_fallback=True)

    # ---- leases --------------------------------------------------------------------------

    def lease_areas(self) -> FileDomainLeases:
        return FileDomainLeases(self.uuid, self.root,
                                Geometry(self.md.block_size, self.md.alignment))

    async def volume_lease(self, img: str, vol: str) -> Resource:
        return self.lease_areas().volume_resource(img, vol)

    async def make_volume_lease(self, md: VolumeMetadata) -> None:
        areas = self.lease_areas()
        path = areas.volume_lease_path(md.image, md.uuid)

        def make() -> None:
            with contextlib.suppress(FileExistsError):
                create_lease_file(path, areas.geometry)

        await _io(self.io, self.root, make)
        await init_volume_lease(areas.volume_resource(md.image, md.uuid), self.md.lock_policy,
                                self.leases.io_timeout, runner=self.runner)


def _give_group(path: Path, gid: int, mode: Callable[[int], int]) -> None:
    """chown path to group gid and chmod it to mode(current), where they
    differ. A refusal (NFS with root_squash) is logged, not raised: the
    export may give access its own way (all_squash, VDSM's 36:36)."""
    st = os.stat(path)
    want = mode(stat.S_IMODE(st.st_mode))
    try:
        if st.st_gid != gid:
            os.chown(path, -1, gid)
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(path, want)
    except PermissionError as e:
        log.warning("Cannot give group %d access to %s: %s", gid, path, e.strerror)
