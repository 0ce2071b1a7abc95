"""Key encapsulation mechanisms behind one interface, and the registry of what this machine has."""

from qkdproxy.core.kem.base import Kem, KemError, KemSizes
from qkdproxy.core.kem.registry import KemRegistry, UnavailableKem, default_registry

__all__ = ["Kem", "KemError", "KemRegistry", "KemSizes", "UnavailableKem", "default_registry"]
