"""m3distill: distil a large text-embedding teacher (BAAI/bge-m3 by default) into small layer-reduced students."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("m3distill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from m3distill.errors import M3DistillError

__all__ = ["M3DistillError", "__version__"]
