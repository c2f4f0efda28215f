"""Exceptions of the DICOM node (one base, one subclass per distinct remedy).

At the network edge these are caught and answered with a DIMSE status
(:mod:`dicom_node.status`); inside the package they are raised.
"""

from __future__ import annotations

from dicom_node.status import Status


class DicomNodeError(Exception):
    """Base of every error raised by :mod:`dicom_node`."""


class InvalidUIDError(DicomNodeError, ValueError):
    """A UID is not a valid DICOM UID (syntax or length); it is never used in a path."""


class InstanceRejected(DicomNodeError):
    """An instance cannot be accepted; carries the DIMSE failure status to answer with.

    ``reason`` is a short, patient-free text for the log and the audit trail.
    """

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(f"{reason} (status 0x{int(status):04X} {status.name})")
        self.status = status
        self.reason = reason


class StorageError(DicomNodeError):
    """The instance store cannot write or read a file (disk full, permissions, I/O)."""


class NodeIndexError(DicomNodeError):
    """The instance index (SQLite) cannot be opened or is inconsistent."""


class NodeConfigurationError(DicomNodeError):
    """The node cannot start with the given settings (TLS files, bind address, data dir)."""
