"""The errors each verb may answer, for the OpenRPC document's standard
`errors` field (OpenRPC error objects: code, message, data).

A job verb lists the errors of the call and those its job may end with (the
job's `error` in getJobs). A verb not listed here (a new one) declares the
errors every verb may answer; add it here with its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rpc.table import Verb
from storage import errors as e

ErrorClass = type[e.HostAgentError]

# Every call: an unexpected error is 100.
_ANY: tuple[ErrorClass, ...] = (e.GeneralException,)
# HostStateError: a change this host records in its state directory, which is full
_JOB = (e.JobExists, e.ActionStopped, e.JobInterrupted, e.HostStateError)
_DOMAIN = (e.StorageDomainDoesNotExist, e.StorageDomainFSNotMounted,
           e.StorageDomainAccessError, e.FileStorageDomainStaleNFSHandle, e.ResourceTimeout)
_ACTIVE = (*_DOMAIN, e.StorageDomainNotActive)
_VOLUME = (e.VolumeDoesNotExist, e.VolumeMetadataReadError, e.ImageDoesNotExistInSD)
_WRITE = (e.NoSpaceLeftOnDomain, e.AcquireLockFailure, e.AcquireHostIdFailure, e.LeaseLost,
          e.LVMCommandError, e.CannotCreateLogicalVolume, e.InvalidParameter)
# ResourceInUse: the domain's OVF store volume is no target of volume verbs
_MAKE = (e.VolumeAlreadyExists, e.VolumeCreationError, e.ImageIsNotLegalChain, e.ResourceInUse)
_CONNECT = (e.StorageServerConnectionError, e.ISCSISetupError, e.ISCSILoginAuthError,
            e.InvalidIpAddress, e.MountError, e.StorageServerAccessPermissionError,
            e.MultipathSetupError, e.InaccessiblePhysDev, e.DuplicateConnection,
            e.InvalidParameter, e.ResourceTimeout, e.HostStateError)
_DISCONNECT = (e.StorageServerDisconnectionError, e.ISCSILogoutError, e.ResourceInUse,
               e.ResourceTimeout)

VERB_ERRORS: dict[str, tuple[ErrorClass, ...]] = {
    "ping": (), "getCapabilities": (), "getStats": (),
    "getJobs": (), "abortJob": (e.UnknownTask,), "clearJob": (e.UnknownTask, e.JobNotDone),
    "testStepJob": _JOB, "testRaise": (),
    "discoverSendTargets": (e.StorageServerConnectionError, e.ISCSIDiscoveryError,
                            e.InvalidIpAddress, e.InvalidParameter, e.ResourceTimeout),
    "getDeviceList": (e.MultipathSetupError, e.InvalidParameter, e.ResourceTimeout),
    # per connection in the result's `status` (the call itself answers 100 or -32602)
    "connectStorageServer": _CONNECT,
    "disconnectStorageServer": _DISCONNECT,
    "getStorageConnections": (),
    "updateStorageConnection": (*_CONNECT, *_DISCONNECT),
    "testStorageConnection": (e.InvalidParameter, e.InvalidIpAddress),
    "createStorageDomain": (e.StorageDomainAlreadyExists, e.StorageServerConnectionError,
                            e.InaccessiblePhysDev, e.VolumeGroupBlockSizeError,
                            e.DeviceBlockSizeError, e.StorageServerAccessPermissionError,
                            e.MultipathSetupError, *_DOMAIN, *_WRITE, e.HostStateError),
    "getStorageDomainInfo": _DOMAIN, "getStorageDomainStats": _DOMAIN,
    "getStorageDomainsList": (),
    "activateStorageDomain": (*_DOMAIN, e.AcquireHostIdFailure, e.HostStateError),
    "deactivateStorageDomain": (e.StorageDomainDoesNotExist, e.ResourceInUse,
                                e.ResourceTimeout, e.HostStateError),
    "setStorageDomainBackup": (*_ACTIVE, e.ResourceInUse, e.AcquireLockFailure),
    "extendStorageDomain": (*_ACTIVE, e.InaccessiblePhysDev, e.PhysDevInitializationError,
                            e.VolumeGroupExtendError, e.VolumeGroupBlockSizeError,
                            e.MultipathSetupError, e.AcquireLockFailure, e.LeaseLost,
                            e.LVMCommandError, e.InvalidParameter),
    "resizePV": (*_ACTIVE, e.InaccessiblePhysDev, e.CouldNotResizePhysicalVolume,
                 e.MultipathSetupError, e.AcquireLockFailure, e.LeaseLost, e.LVMCommandError,
                 e.InvalidParameter),
    "formatStorageDomain": (*_DOMAIN, e.ResourceInUse, e.AcquireLockFailure,
                            e.LVMCommandError, e.HostStateError),
    "createVolume": (*_JOB, *_ACTIVE, *_VOLUME, *_MAKE, e.CreateIllegalVolumeSnapshotError,
                     *_WRITE),
    "getVolumeInfo": (*_DOMAIN, *_VOLUME),
    "getVolumesList": (*_DOMAIN, e.ImageDoesNotExistInSD),
    "getImagesList": _DOMAIN,
    "extendVolumeSize": (*_ACTIVE, *_VOLUME, e.VolumeResizeValueError, e.GenerationMismatch,
                         e.ResourceInUse, *_WRITE),
    "updateVolume": (*_ACTIVE, *_VOLUME, e.GenerationMismatch, e.ResourceInUse,
                     e.InvalidParameter, e.AcquireLockFailure, e.LeaseLost),
    "measureVolume": (*_DOMAIN, e.StorageDomainNotActive, *_VOLUME,
                      e.PrepareIllegalVolumeError, e.LVMCommandError),
    "extendVolume": (*_ACTIVE, *_VOLUME, e.GenerationMismatch, e.NoSpaceLeftOnDomain,
                     e.AcquireLockFailure, e.LeaseLost, e.LVMCommandError),
    "refreshVolume": (*_ACTIVE, *_VOLUME, e.LVMCommandError),
    "reduceVolume": (*_JOB, *_ACTIVE, *_VOLUME, e.VolumeIsBusy, e.GenerationMismatch,
                     e.AcquireLockFailure, e.LeaseLost, e.LVMCommandError, e.InvalidParameter),
    "deleteVolume": (*_ACTIVE, *_VOLUME, e.VolumeIsBusy, e.VolumeImageHasChildren,
                     e.ResourceInUse,
                     e.GenerationMismatch, e.AcquireLockFailure, e.LeaseLost,
                     e.LVMCommandError),
    "deleteImage": (*_JOB, *_ACTIVE, *_VOLUME, e.VolumeIsBusy, e.VolumeImageHasChildren,
                    e.ResourceInUse,
                    e.AcquireLockFailure, e.LeaseLost, e.LVMCommandError),
    "prepareImage": (*_ACTIVE, *_VOLUME, e.PrepareIllegalVolumeError, e.VolumeNonWritable,
                     e.BackupDomainRestricted, e.LVMCommandError, e.InvalidParameter,
                     e.HostStateError),
    "teardownImage": (*_DOMAIN, *_VOLUME, e.HostStateError),
    "copyImage": (*_JOB, *_ACTIVE, *_VOLUME, *_MAKE, e.VolumeCopyError,
                  e.PrepareIllegalVolumeError, *_WRITE),
    "moveImage": (*_JOB, *_ACTIVE, *_VOLUME, *_MAKE, e.VolumeCopyError,
                  e.PrepareIllegalVolumeError, e.VolumeIsBusy, e.VolumeImageHasChildren,
                  e.BackupDomainRestricted, *_WRITE),
    "snapshotImages": (*_JOB, *_ACTIVE, *_VOLUME, *_MAKE, e.CreateIllegalVolumeSnapshotError,
                       e.VolumeIsBusy, *_WRITE),
    "mergeSnapshots": (*_JOB, *_ACTIVE, *_VOLUME, *_WRITE, e.VolumeIsBusy,
                       e.PrepareIllegalVolumeError, e.ResourceInUse, e.GenerationMismatch),
    "createHibernationVolumes": (*_JOB, *_ACTIVE, *_VOLUME, *_MAKE,
                                 e.PrepareIllegalVolumeError, e.BackupDomainRestricted,
                                 *_WRITE),
    "backupVolume": (*_JOB, *_ACTIVE, *_VOLUME, *_MAKE, e.VolumeCopyError,
                     e.PrepareIllegalVolumeError, e.VolumeIsBusy, e.BackupDomainRestricted,
                     *_WRITE),
    "uploadOvfTar": (*_ACTIVE, e.OvfStoreError, e.OvfTicketError, e.InvalidParameter,
                     e.NoSpaceLeftOnDomain,
                     e.AcquireLockFailure, e.LeaseLost),
    "getOvfStoreInfo": (*_DOMAIN, e.OvfStoreError),
    "listOvfEntities": (*_DOMAIN, e.OvfStoreError),
    "startTransfer": (*_ACTIVE, *_VOLUME, e.VolumeIsBusy, e.VolumeImageHasChildren,
                      e.ResourceInUse, e.InvalidParameter, e.AcquireLockFailure,
                      e.AcquireHostIdFailure, e.LVMCommandError),
    "getTransfer": (e.TransferDoesNotExist,),
    "finalizeTransfer": (e.TransferDoesNotExist, e.TransferTicketError,
                         e.ImageVerificationError, e.LeaseLost, *_DOMAIN),
    "cancelTransfer": (e.TransferDoesNotExist, e.TransferTicketError, e.VolumeIsBusy,
                       e.AcquireLockFailure, e.LeaseLost, *_DOMAIN),
}

INVALID_PARAMS = {"code": -32602, "message": "Invalid params",
                  "data": {"name": "InvalidParams"}}


def error_object(cls: ErrorClass) -> dict[str, Any]:
    return {"code": cls.code, "message": cls.template, "data": {"name": cls.error_name()}}


def method_errors(verb: Verb) -> list[dict[str, Any]]:
    """The verb's possible errors as OpenRPC error objects, each code once,
    by code."""
    classes: Sequence[ErrorClass] = VERB_ERRORS.get(verb.name, (e.InvalidParameter,))
    out: dict[int, dict[str, Any]] = {}
    if verb.params:
        out[-32602] = INVALID_PARAMS
    for cls in (*_ANY, *classes):
        out.setdefault(cls.code, error_object(cls))
    return [out[c] for c in sorted(out)]
