"""The resource locks moved to the storage layer (storage/locks.py): this name
stays for the agent's callers; storage and ovfstore import storage.locks."""

from storage.locks import EXCLUSIVE, RANK, SHARED, LockManager, Request, request

__all__ = ["EXCLUSIVE", "RANK", "SHARED", "LockManager", "Request", "request"]
