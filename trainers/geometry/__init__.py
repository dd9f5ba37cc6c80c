"""3D representations: the hash-grid encoding and the implicit volume built on it."""

from trainers.geometry.hash_grid import HashGridConfig, HashGridEncoding, TcnnHashGrid, make_hash_grid
from trainers.geometry.implicit_volume import ImplicitVolume, ImplicitVolumeConfig

__all__ = [
    "HashGridConfig",
    "HashGridEncoding",
    "ImplicitVolume",
    "ImplicitVolumeConfig",
    "TcnnHashGrid",
    "make_hash_grid",
]
