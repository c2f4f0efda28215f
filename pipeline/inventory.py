"""The planner's view of the node's index: a patient's stable series with what the
planner needs (content version, pixel fingerprint, acquisition date, files).

Reads the index (``dicom_node.index.InstanceIndex``) and the stability marks
(``dicom_node.stability.StabilityMonitor.is_stable``); opens the instance files only to
read a few header attributes and, for series that could be copies of each other (same
kind, modality and number of instances), hash the pixel data / encapsulated document
(cached per series content version, so a re-plan does not re-read a series).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

from pipeline.planner import SeriesInfo

log = logging.getLogger(__name__)

OUR_MANUFACTURER = "dentfuse"


def content_version(instances: list[Any]) -> str:
    """Hash of the series' instances (SOP instance UID + file sha256), order independent."""
    h = hashlib.sha256()
    for uid, sha in sorted((i.sop_instance_uid, i.sha256) for i in instances):
        h.update(f"{uid}={sha};".encode("ascii", "replace"))
    return h.hexdigest()[:32]


def read_header(path: str) -> dict[str, str]:
    """Date, frame of reference and manufacturer of one instance (header only)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    header: dict[str, str] = {}
    for attr in ("AcquisitionDate", "SeriesDate", "StudyDate", "ContentDate"):
        v = str(ds.get(attr, "") or "")
        if v:
            header["date"] = v
            break
    header["frame_of_reference_uid"] = str(ds.get("FrameOfReferenceUID", "") or "")
    header["manufacturer"] = str(ds.get("Manufacturer", "") or "")
    return header


def pixel_fingerprint(paths: list[str]) -> str:
    """Hash of the pixel data (or encapsulated document) of every file, order independent:
    equal for a series re-sent under new UIDs."""
    import pydicom

    digests = []
    for p in sorted(paths):
        ds = pydicom.dcmread(p, force=True)
        payload = b""
        for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "EncapsulatedDocument"):
            if kw in ds:
                payload = ds[kw].value or b""
                break
        digests.append(hashlib.sha256(payload).hexdigest())
    return hashlib.sha256(";".join(sorted(digests)).encode("ascii")).hexdigest()[:32]


class IndexInventory:
    """:class:`pipeline.planner.Inventory` over the node's index and stability monitor."""

    def __init__(self, index: Any, stability: Any, *, require_stable: bool = True) -> None:
        self.index = index
        self.stability = stability
        self.require_stable = require_stable
        self._headers: dict[tuple[str, str], dict[str, str]] = {}
        self._fingerprints: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def stable_series(self, patient_key: str) -> list[SeriesInfo]:
        summaries = []
        for s in self.index.series(patient_key=patient_key):
            if s.patient_key != patient_key:
                continue
            if self.require_stable and not self.stability.is_stable(s.series_instance_uid):
                continue
            summaries.append(s)
        # only series that could be copies of each other (same kind, modality and number of
        # instances) need their pixel data hashed
        groups: dict[tuple[str, str, int], int] = {}
        for s in summaries:
            key = (s.kind, s.modality, s.instance_count)
            groups[key] = groups.get(key, 0) + 1
        return [self.describe(s, fingerprint=groups[(s.kind, s.modality, s.instance_count)] > 1)
                for s in summaries]

    def describe(self, s: Any, fingerprint: bool = True) -> SeriesInfo:
        """A :class:`SeriesInfo` for one index series summary (``fingerprint``: hash its pixels)."""
        instances = self.index.instances(series_instance_uid=s.series_instance_uid)
        version = content_version(instances)
        paths = tuple(sorted(i.path for i in instances))
        fp, header = "", {}
        if s.kind in ("volume", "surface") and paths:
            key = (s.series_instance_uid, version)
            with self._lock:
                header = self._headers.get(key, {})
                fp = self._fingerprints.get(key, "")
            try:
                if not header:
                    header = read_header(paths[0])
                if fingerprint and not fp:
                    fp = pixel_fingerprint(list(paths))
            except Exception as exc:  # unreadable: plan without duplicate detection
                log.warning("series %s: cannot read its files (%s); duplicate detection off for it",
                            s.series_instance_uid, exc)
            with self._lock:
                self._headers[key] = header
                if fp:
                    self._fingerprints[key] = fp
        return SeriesInfo(
            patient_key=s.patient_key, study_instance_uid=s.study_instance_uid,
            series_instance_uid=s.series_instance_uid, modality=s.modality, kind=s.kind,
            instance_count=s.instance_count, content_version=version, pixel_fingerprint=fp,
            acquisition_date=header.get("date", ""), first_received_at=s.first_received_at,
            derived_by_us=header.get("manufacturer", "").strip().lower() == OUR_MANUFACTURER,
            paths=paths, frame_of_reference_uid=header.get("frame_of_reference_uid", ""),
        )

    def calling_ae_titles(self, series_instance_uid: str) -> list[str]:
        return sorted({i.calling_ae_title for i in self.index.instances(series_instance_uid=series_instance_uid)})
