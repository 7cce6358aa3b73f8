"""The version of m3distill: one fact, in a module that imports nothing of m3distill's, so every floor can read it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("m3distill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
