"""Storage domains (file and block) and the volumes in them."""

from storage.domains.base import Domain, VmAccess, VolumeSpec
from storage.domains.manager import DomainManager

__all__ = ["Domain", "DomainManager", "VmAccess", "VolumeSpec"]
