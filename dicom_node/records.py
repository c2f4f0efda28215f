"""Records that leave the DICOM node (frozen, standard library only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

InstanceKind = Literal["volume", "surface", "2d", "registration", "segmentation", "other"]


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance that is durably on disk and indexed.

    Exists only after the file was written to a temporary file, fsync'd, renamed into
    place and indexed; ``path`` is the final path, ``sha256`` the hash of its bytes as
    received (the stored file is byte-identical to what the sender sent, with the
    File Meta Information group prepended).
    """

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_key: str  # PatientID, or PatientID^IssuerOfPatientID
    modality: str
    kind: InstanceKind
    path: str
    sha256: str
    size_bytes: int
    transfer_syntax_uid: str
    calling_ae_title: str
    received_at: str  # ISO 8601 UTC


@dataclass(frozen=True)
class SeriesStable:
    """A series has been quiet for the configured period (it may re-open later)."""

    event_id: int
    study_instance_uid: str
    series_instance_uid: str
    patient_key: str
    modality: str
    kind: InstanceKind
    instance_count: int
    stable_at: str  # ISO 8601 UTC
