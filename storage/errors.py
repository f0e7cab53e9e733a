"""The agent's error tree: one table of typed errors, each with its code.

Storage errors keep VDSM's numeric codes so an engine that knows VDSM reads
them unchanged; codes for conditions VDSM has no name for start at 2000.
Each class has a message template filled from its fields; the fields travel
to the client in the JSON-RPC error's `data` (never secrets: callers pass
what is safe to show). The RPC edge is the only place that turns these into
JSON-RPC errors (rpc/errors.py).
"""

from __future__ import annotations

from typing import Any, ClassVar


class HostAgentError(Exception):
    """Base of every expected error. Subclasses set `code` and `template`."""

    code: ClassVar[int] = 100
    template: ClassVar[str] = "General exception"

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
        return type(self).__name__

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


# Conditions VDSM has no code for: 2000 and up, same style.


class JobAlreadyExists(HostAgentError):
    """The same jobUUID was sent with a different verb or parameters."""

    code = 2001
    template = "Job {jobUUID} exists with different parameters"


class ResourceInUse(HostAgentError):
    code = 2002
    template = "{resource} is in use: {reason}"


class DuplicateConnection(HostAgentError):
    code = 2003
    template = "Connection {id} targets the same storage as connection {existing}"


class BackupDomainRestricted(HostAgentError):
    code = 2004
    template = "Storage domain {sdUUID} is a backup domain: {reason}"


class JobNotEnded(HostAgentError):
    code = 2005
    template = "Job {jobUUID} has not ended (status {status})"


class JobInterrupted(HostAgentError):
    code = 2006
    template = "Job {jobUUID} was interrupted: the agent stopped while it ran"


class StorageDomainNotActive(HostAgentError):
    code = 2008
    template = "Storage domain {sdUUID} is not active on this host"


class StorageDomainFailing(HostAgentError):
    code = 2009
    template = "Storage domain {sdUUID} is failing: {reason}"


class OvfStoreError(HostAgentError):
    code = 2010
    template = "OVF store upload refused: {reason}"


class OvfTicketError(HostAgentError):
    code = 2011
    template = "OVF store ticket refused: {reason}"


class OperationAborted(HostAgentError):
    code = 2007
    template = "Operation aborted"


class LeaseLost(HostAgentError):
    """A lease held while work ran was lost (storage gone, lease revoked):
    the work was stopped."""

    code = 2012
    template = "Lease on {resource} was lost: {reason}"


ALL_ERRORS: tuple[type[HostAgentError], ...] = tuple(
    cls for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, HostAgentError)
)


def error_table() -> list[dict[str, Any]]:
    """Every error class with its code, for rpc.discover and the README."""
    return [{"code": c.code, "name": c.__name__, "message": c.template}
            for c in sorted(ALL_ERRORS, key=lambda c: c.code)]
