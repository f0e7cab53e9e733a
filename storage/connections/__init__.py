"""Storage connections: NFS, posixfs, localfs, iSCSI (with multipath), FC."""

from storage.connections.base import Connection
from storage.connections.manager import ConnectionManager

__all__ = ["Connection", "ConnectionManager"]
