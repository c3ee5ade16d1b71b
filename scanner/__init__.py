"""lensscan's scanner: survey tiles -> stamps -> ensemble scores -> ranked candidate catalogs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lensscan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
