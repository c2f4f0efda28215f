"""A real Orthanc on loopback for interoperability tests.

:class:`OrthancServer` writes a configuration in a temporary directory (storage and index
there too), picks free HTTP and DICOM ports on 127.0.0.1, starts ``Orthanc config.json``
and polls ``GET /system`` until it answers. ``stop()`` terminates it (and kills it if it
does not exit); ``start()`` again reuses the same ports, storage and index, which is how
the tests simulate a PACS that is down and comes back.

Use :func:`orthanc_program` (skips, or fails under ``DENTFUSE_REQUIRE_PEERS=1``) to find
the binary. Nothing here is imported by the product.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from conftest import free_port, require_peer


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc knows (needed for C-MOVE to it)."""

    name: str
    ae_title: str
    host: str
    port: int


def orthanc_program() -> str:
    """Path to the Orthanc binary (Debian installs it in /usr/sbin, often not on PATH)."""
    path = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if path is None:
        require_peer("Orthanc")  # skips or fails with the standard message
    assert path is not None
    return path


class OrthancServer:
    """An Orthanc process on 127.0.0.1 with its own storage in ``workdir``."""

    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC",
                 modalities: Iterable[Modality] = (), stable_age_s: int = 1,
                 program: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.program = program or orthanc_program()
        self.ae_title = ae_title
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = tuple(modalities)
        self.stable_age_s = stable_age_s
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    # -- lifecycle ---------------------------------------------------------------
    def _write_config(self) -> None:
        config = {
            "Name": "dentfuse-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                m.name: {"AET": m.ae_title, "Host": m.host, "Port": m.port,
                         "AllowEcho": True, "AllowStore": True, "AllowFind": True,
                         "AllowMove": True, "AllowGet": True}
                for m in self.modalities
            },
            "StableAge": self.stable_age_s,
            "Plugins": [],
            "StorageCompression": False,
            "OverwriteInstances": False,
            "HttpTimeout": 30,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
        }
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def start(self, timeout_s: float = 20.0) -> "OrthancServer":
        if self.running:
            return self
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [self.program, str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode} at start-up; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self.get("/system").get("DicomPort") == self.dicom_port:
                    return self
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within {timeout_s} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- REST ----------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> Any:
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            data = rsp.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as rsp:
            return rsp.read()

    def post(self, path: str, data: Any) -> Any:
        return self._request("POST", path, json.dumps(data).encode())

    def upload(self, files: Iterable[Path]) -> list[str]:
        """Upload DICOM files by ``POST /instances``; return Orthanc's instance ids."""
        ids = []
        for f in files:
            rsp = self._request("POST", "/instances", Path(f).read_bytes(), "application/dicom")
            ids.append(rsp["ID"])
        return ids

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance stored in Orthanc."""
        uids = set()
        for oid in self.instances():
            uids.add(self.get(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"])
        return uids

    def lookup(self, uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        rsp = self._request("POST", "/tools/lookup", uid.encode(), "text/plain")
        for hit in rsp or []:
            if hit.get("Type") == "Instance":
                return hit["ID"]
        return None

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file of an instance (as Orthanc keeps it)."""
        oid = self.lookup(sop_instance_uid)
        if oid is None:
            raise KeyError(f"Orthanc has no instance {sop_instance_uid}")
        return self.get_bytes(f"/instances/{oid}/file")


# -- small deterministic series for the PACS tests ---------------------------------------------
def make_series(out: Path, *, n: int = 4, seed: int = 1, patient_id: str = "DF-0001",
                modality: str = "CT", sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid: str = "1.2.840.10008.1.2.1", rows: int = 32, cols: int = 32,
                study_instance_uid: str | None = None, study_date: str = "20250101",
                issuer_of_patient_id: str = "") -> list[Path]:
    """Write ``n`` single-frame int16 slices (seeded pixels and UIDs) as Part 10 files.

    Uncompressed only (Explicit or Implicit VR Little Endian); returns the paths in
    slice order.
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(seed), patient_id, issuer_of_patient_id, modality, *map(str, parts)])

    study = study_instance_uid or uid("study")
    series, frame = uid("series"), uid("frame")
    paths = []
    for i in range(n):
        sop = uid("sop", i)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = transfer_syntax_uid
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop
        ds.PatientID, ds.PatientName = patient_id, "Synthetic^Patient"
        ds.PatientBirthDate, ds.PatientSex = "19800101", "F"
        if issuer_of_patient_id:
            ds.IssuerOfPatientID = issuer_of_patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = study_date, "101010", f"A{seed}", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, seed, i + 1
        ds.StudyDescription, ds.SeriesDescription = "synthetic", f"{modality} series {seed}"
        ds.ImagePositionPatient = [0.0, 0.0, 0.5 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 0.5
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = rng.integers(-1000, 3000, (rows, cols), dtype=np.int16).tobytes()
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(data: bytes) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information group."""
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = io.BytesIO(data)
    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return data[fh.tell():]
