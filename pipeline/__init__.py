"""dentfuse pipeline: configuration, wiring, jobs, reports and the ``dentfuse`` CLI."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("dentfuse")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
