"""The agent's error tree: one table of typed errors, each with its code.

Where VDSM names a condition, its error here has VDSM's code and VDSM's
class name as `data.name` (vdsm lib/vdsm/storage/exception.py and
lib/vdsm/common/exception.py; tests/data/vdsm_errors.json is the copy the
unit test holds this table against), so an engine that knows VDSM reads them
unchanged. Conditions VDSM has no error for use 2100-2199: VDSM uses 0-1001,
1100, 1500, 1600-1651, 2000-2009, 3000-3001, 4000 and 4900, and reserves
everything above 5000 for the engine ("DO NOT USE CODES GREATER THAN 5000" in
its storage/exception.py); 2100-2999 is a gap in both files.

Each class has a message template filled from its fields; the fields travel
to the client in the JSON-RPC error's `data` (never secrets: callers pass
what is safe to show). One translator, `wire_error()` below, turns them
into wire errors (rpc/dispatch.py, the jobs, the connection results, the OVF
data paths, which add `http_status()`). A subclass that does not set its own
`code` is the same condition on the wire: it answers its parent's code and
name (LeaseHeld is an AcquireLockFailure; a CommandError a GeneralException).
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any, ClassVar


class HostAgentError(Exception):
    """Base of every expected error. Subclasses set `code` and `template`."""

    code: ClassVar[int] = 100
    template: ClassVar[str] = "General exception"
    # data.name when it is not the class name: VDSM names that are not
    # Python class names (iSCSISetupError) or that this code base spells
    # otherwise (InvalidParameterException).
    wire_name: ClassVar[str] = "GeneralException"

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        try:
            message = self.template.format(**fields)
        except (KeyError, IndexError):
            message = self.template
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])

    @property
    def name(self) -> str:
        return type(self).error_name()

    @classmethod
    def error_name(cls) -> str:
        """The name sent in data.name: that of the nearest class (this one
        or a parent) that sets its own code."""
        for c in cls.__mro__:
            if "code" in c.__dict__:
                return str(c.__dict__.get("wire_name") or c.__name__)
        return cls.__name__

    def to_dict(self) -> dict[str, Any]:
        """The JSON-RPC error object: {code, message, data: {name, **fields}}."""
        return {"code": self.code, "message": self.message,
                "data": {"name": self.name, **self.fields}}


class GeneralException(HostAgentError):
    code = 100
    template = "General exception: {reason}"


class InvalidParameter(HostAgentError):
    """A value that is well formed but not acceptable (JSON-RPC shape errors
    are -32602 at the edge; this is for checks that need the host's state)."""

    code = 1000
    wire_name = "InvalidParameterException"
    template = "Invalid parameter {field}: {reason}"


class VolumeDoesNotExist(HostAgentError):
    code = 201
    template = "Volume does not exist: {volUUID}"


class VolumeCreationError(HostAgentError):
    code = 205
    template = "Error creating volume {volUUID}: {reason}"


class VolumeAlreadyExists(HostAgentError):
    code = 212
    template = "Volume already exists: {volUUID}"


class VolumeNonWritable(HostAgentError):
    """A write to a volume that is not a leaf (VDSM's code): a VM writing a
    parent corrupts every volume layered on it."""

    code = 213
    template = "Volume cannot be written: {volUUID}: {reason}"


class VolumeCopyError(HostAgentError):
    code = 225
    template = "Volume copy failed: {reason}"


class PrepareIllegalVolumeError(HostAgentError):
    code = 227
    wire_name = "prepareIllegalVolumeError"
    template = "Cannot prepare illegal volume {volUUID}"


class ImageIsNotLegalChain(HostAgentError):
    """A volume added to an image would not go on top of the image's one
    chain (VDSM's code for an image that is not one legal chain)."""

    code = 262
    template = "Image is not a legal chain: {imgUUID} in domain {sdUUID}: {reason}"


class ImageDoesNotExistInSD(HostAgentError):
    code = 268
    template = "Image {imgUUID} does not exist in domain {sdUUID}"


class StorageDomainDoesNotExist(HostAgentError):
    code = 358
    template = "Storage domain does not exist: {sdUUID}"


class StorageDomainAlreadyExists(HostAgentError):
    code = 365
    template = "Storage domain already exists: {sdUUID}"


class StorageDomainFSNotMounted(HostAgentError):
    code = 360
    template = "Storage domain file system is not mounted: {path}"


class NoSpaceLeftOnDomain(HostAgentError):
    code = 397
    template = "No space left on storage domain {sdUUID}"


class UnknownTask(HostAgentError):
    code = 401
    template = "Unknown job: {jobUUID}"


class StorageServerConnectionError(HostAgentError):
    code = 451
    template = "Could not connect to storage server: {reason}"


class StorageServerDisconnectionError(HostAgentError):
    code = 452
    template = "Could not disconnect from storage server: {reason}"


class ISCSISetupError(HostAgentError):
    code = 465
    wire_name = "iSCSISetupError"
    template = "iSCSI setup failed: {reason}"


class StorageServerAccessPermissionError(HostAgentError):
    code = 469
    template = "Permission settings on the storage do not allow access: {path}"


class MountError(HostAgentError):
    code = 477
    template = "Mount failed: {reason}"


class CannotCreateLogicalVolume(HostAgentError):
    code = 550
    template = "Cannot create logical volume {lvName} in {vgName}: {reason}"


class LVMCommandError(HostAgentError):
    code = 621
    template = "LVM command failed: {reason}"


class AcquireLockFailure(HostAgentError):
    code = 651
    template = "Cannot acquire lock on {resource}: {reason}"


class LeaseHeld(AcquireLockFailure):
    """The lease is held by another host or process (not a failure to reach
    the lease: that is AcquireLockFailure itself)."""


class AcquireHostIdFailure(HostAgentError):
    code = 661
    template = "Cannot acquire host id on domain {sdUUID}: {reason}"


class ResourceTimeout(HostAgentError):
    code = 851
    template = "Operation timed out: {reason}"


class GenerationMismatch(HostAgentError):
    code = 911
    template = "Generation mismatch on {volUUID}: expected {expected}, actual {actual}"


class JobNotDone(HostAgentError):
    code = 68
    template = "Job {jobUUID} has not ended (status {status})"


class JobExists(HostAgentError):
    """The same jobUUID was sent with a different verb or parameters."""

    code = 69
    template = "Job {jobUUID} exists with different parameters"


class VolumeIsBusy(HostAgentError):
    """The volume (or a volume of the image) is prepared or otherwise in use."""

    code = 203
    template = "{resource} is busy: {reason}"


class VolumeImageHasChildren(HostAgentError):
    code = 204
    template = "Cannot delete {resource}: {reason}"


class VolumeMetadataReadError(HostAgentError):
    """The volume's metadata is there but cannot be read as metadata
    (not 201: the volume is not gone, and an engine must not forget it)."""

    code = 207
    template = "Volume {volUUID} metadata is damaged: {reason}"


class CreateIllegalVolumeSnapshotError(HostAgentError):
    code = 226
    wire_name = "createIllegalVolumeSnapshotError"
    template = "Cannot create a snapshot of illegal volume {volUUID}"


class VolumeResizeValueError(HostAgentError):
    code = 232
    template = "Volume {volUUID} cannot shrink: {reason}"


class StorageDomainNotActive(HostAgentError):
    code = 369
    template = "Storage domain {sdUUID} is not active on this host"


class StorageDomainAccessError(HostAgentError):
    """The domain's storage answers with errors or not at all (VDSM: "Domain
    is either partially accessible or entirely inaccessible")."""

    code = 379
    template = "Storage domain {sdUUID} is failing: {reason}"


class FileStorageDomainStaleNFSHandle(HostAgentError):
    code = 384
    template = "Stale NFS handle on {path}"


class ActionStopped(HostAgentError):
    code = 443
    template = "Operation aborted"


class MultipathSetupError(HostAgentError):
    code = 467
    template = "Multipath setup failed: {reason}"


class InvalidIpAddress(HostAgentError):
    code = 472
    template = "Invalid iSCSI portal address {portal}: {reason}"


class ISCSILogoutError(HostAgentError):
    code = 474
    wire_name = "iSCSILogoutError"
    template = "iSCSI logout failed: {reason}"


class ISCSIDiscoveryError(HostAgentError):
    code = 475
    wire_name = "iSCSIDiscoveryError"
    template = "iSCSI discovery failed: {reason}"


class ISCSILoginAuthError(HostAgentError):
    code = 476
    wire_name = "iSCSILoginAuthError"
    template = "iSCSI login refused (authorization): {reason}"


class VolumeGroupBlockSizeError(HostAgentError):
    code = 517
    template = "All devices of a domain must have the same block size: {reason}"


class DeviceBlockSizeError(HostAgentError):
    code = 518
    template = "Device block size is not supported: {reason}"


class InaccessiblePhysDev(HostAgentError):
    """A LUN asked for is not visible to this host (no multipath device)."""

    code = 606
    template = "Cannot access device(s): {devices}"


class PhysDevInitializationError(HostAgentError):
    """A LUN cannot become a PV of the domain: it belongs to another VG,
    holds data or is in use."""

    code = 601
    template = "Failed to initialize physical device: {devices}: {reason}"


class VolumeGroupExtendError(HostAgentError):
    code = 503
    template = "Cannot extend volume group {vgName}: {reason}"


class CouldNotResizePhysicalVolume(HostAgentError):
    code = 615
    template = "Could not resize physical volume {device}: {reason}"


class TransferTicketError(HostAgentError):
    """A disk transfer's ticket that is unknown, expired, closed or does not
    allow the request (HTTP 403 on the data listener)."""

    code = 481
    wire_name = "ImageTicketsError"
    template = "Transfer ticket refused: {reason}"


class ImageVerificationError(HostAgentError):
    """An uploaded image that failed its check (VDSM's verify_untrusted):
    the volume stays ILLEGAL."""

    code = 484
    template = "Image of volume {volUUID} failed verification: {reason}"


# Conditions VDSM has no error for: 2100-2199 (see the module docstring).


class ResourceInUse(HostAgentError):
    """A domain or connection in use (prepared volumes); a volume in use is
    VolumeIsBusy."""

    code = 2102
    template = "{resource} is in use: {reason}"


class DuplicateConnection(HostAgentError):
    code = 2103
    template = "Connection {id} targets the same storage as connection {existing}"


class BackupDomainRestricted(HostAgentError):
    code = 2104
    template = "Storage domain {sdUUID} is a backup domain: {reason}"


class JobInterrupted(HostAgentError):
    code = 2106
    template = "Job {jobUUID} was interrupted: the agent stopped while it ran"


class HostStateError(HostAgentError):
    """A record of the host's own state (connections, active domains,
    prepared volumes, jobs) could not be written in the state directory,
    typically its file system full: the change it records was not made."""

    code = 2107
    template = "Cannot record {what} in {path}: {reason}"

    @classmethod
    def of(cls, what: str, path: object, e: BaseException) -> HostStateError:
        """From the write's error (an OSError: its strerror)."""
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return cls(what=what, path=str(path), reason=reason)


class OvfStoreError(HostAgentError):
    code = 2110
    template = "OVF store upload refused: {reason}"


class OvfTicketError(HostAgentError):
    code = 2111
    template = "OVF store ticket refused: {reason}"


class LeaseLost(HostAgentError):
    """A lease held while work ran was lost (storage gone, lease revoked):
    the work was stopped."""

    code = 2112
    template = "Lease on {resource} was lost: {reason}"


class TransferDoesNotExist(HostAgentError):
    code = 2120
    template = "Transfer {transferId} does not exist"


ALL_ERRORS: tuple[type[HostAgentError], ...] = tuple(
    cls for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, HostAgentError)
)


# ---- the one translation to the wire --------------------------------------------

UNEXPECTED = "unexpected error, see the agent log"


def wire_error(e: BaseException) -> dict[str, Any]:
    """An error as the wire's error object {code, message, data}: an expected
    error with its code and fields; anything else (a bug) as 100 with a
    generic message, nothing of it shown (the caller logs its traceback)."""
    if isinstance(e, HostAgentError):
        return e.to_dict()
    return GeneralException(reason=UNEXPECTED).to_dict()


# The HTTP status of an error on the data paths (OVF store PUT/GET, disk
# transfers); 500 for any other, expected or not.
HTTP_STATUS: dict[type[HostAgentError], int] = {
    OvfTicketError: 403, AcquireLockFailure: 409, OvfStoreError: 400,
    StorageDomainDoesNotExist: 404, VolumeDoesNotExist: 404, NoSpaceLeftOnDomain: 507,
    TransferTicketError: 403, TransferDoesNotExist: 404, InvalidParameter: 400}


def http_status(e: BaseException) -> int:
    return next((s for cls, s in HTTP_STATUS.items() if isinstance(e, cls)), 500)


# ---- out of space, recognised in one place ------------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# What a tool says for those errnos: the C library's text (qemu-img, dd, lvm),
# or the negative errno (sanlock: "-28").
_NO_SPACE_TEXT = re.compile("|".join(
    [re.escape(os.strerror(n)) for n in _NO_SPACE]
    + [rf"(?<![0-9])-{n}(?![0-9])" for n in _NO_SPACE] + ["ENOSPC", "EDQUOT"]))


def out_of_space(e: BaseException) -> bool:
    """Whether an error means the storage has no room: an OSError by its
    errno, a tool's error by the errno it reports."""
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE
    if isinstance(e, NoSpaceLeftOnDomain):
        return True
    return isinstance(e, HostAgentError) and bool(_NO_SPACE_TEXT.search(e.message))


def error_table() -> list[dict[str, Any]]:
    """Every condition (a class that sets its own code) with its code and
    wire name, for rpc.discover and the README."""
    return [{"code": c.code, "name": c.error_name(), "message": c.template}
            for c in sorted(ALL_ERRORS, key=lambda c: c.code)
            if "code" in c.__dict__ and c is not HostAgentError]
