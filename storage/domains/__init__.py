"""Storage domains (file and block) and the volumes in them."""

from storage.domains.base import Domain, VmAccess, VolumeSpec
from storage.domains.registry import DomainRegistry

__all__ = ["Domain", "DomainRegistry", "VmAccess", "VolumeSpec"]
