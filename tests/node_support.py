"""Helpers shared by the tests of the DICOM listener (tests/test_node_*.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import socket
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from conftest import dcmtk  # noqa: F401 - re-exported: the node tests import it from here

if TYPE_CHECKING:
    from dicom_node.server import DicomNode


CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
UID_ROOT = "1.2.826.0.1.3680043.10.1090."  # test-only root


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: TCP_NODELAY=1 (without it, Nagle's algorithm makes
    dcmtk crawl on loopback)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def make_ct_series(out_dir: Path, n: int, *, seed: int = 0, patient_id: str = "DF-TEST",
                   rows: int = 64, cols: int = 64, study_uid: str | None = None,
                   series_uid: str | None = None, prefix: str = "") -> list[Path]:
    """Write ``n`` CT slices (Explicit VR LE, one file each); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid(UID_ROOT)
    series_uid = series_uid or generate_uid(UID_ROOT)
    paths = []
    for i in range(n):
        ds = ct_dataset(rng, patient_id, study_uid, series_uid, i, rows, cols)
        p = out_dir / f"{prefix}{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def ct_dataset(rng: np.random.Generator, patient_id: str, study_uid: str, series_uid: str,
               i: int, rows: int = 64, cols: int = 64, sop_uid: str | None = None,
               bits: int = 16) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid(UID_ROOT)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else study_uid
    ds.PatientID = patient_id
    ds.PatientName = "TEST^PATIENT"
    ds.Modality = "CT"
    ds.InstanceNumber = i + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(i)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        arr = rng.integers(0, 255, size=(rows, cols), dtype=np.uint8)
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        arr = rng.integers(0, 4000, size=(rows, cols), dtype=np.uint16)
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = arr.tobytes()
    return ds


def dataset_offset(path: Path) -> int:
    """Offset of the dataset after the File Meta group (independent of dicom_node)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
        assert head[128:132] == b"DICM", f"{path} is not a Part 10 file"
        pos = 132
        while True:
            b = fh.read(8)
            if len(b) < 8:
                return pos
            group, _elem = struct.unpack("<HH", b[:4])
            if group != 0x0002:
                return pos
            vr = b[4:6]
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
                length = struct.unpack("<I", fh.read(4))[0]
                pos += 12 + length
            else:
                length = struct.unpack("<H", b[6:8])[0]
                pos += 8 + length
            fh.seek(pos)


def dataset_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(dataset_offset(path))
        return hashlib.sha256(fh.read()).hexdigest()


def sop_uid_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def stored_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "instances").rglob("*.dcm") if ".incoming" not in p.parts)


def temp_files(data_dir: Path) -> list[Path]:
    root = data_dir / "instances"
    return sorted(p for p in root.rglob("*") if p.is_file() and (".incoming" in p.parts or p.name.endswith(".partial")))


def copy_tree(paths: Iterable[Path], dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        q = dst / p.name
        shutil.copy2(p, q)
        out.append(q)
    return out


def scu_associate(port: int, contexts=(CT, MR), calling: str = "FUZZ", called: str = "DENTFUSE",
                  tls_args=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    for c in contexts:
        for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5"):
            ae.add_requested_context(c, ts)  # one context per syntax, so each is accepted
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    assert assoc.is_established
    # pynetdicom's SCU leaves Nagle on: ~40 ms per C-STORE on loopback without this
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def dataset_body(ds) -> bytes:
    b = io.BytesIO()
    ds.save_as(b, enforce_file_format=True)
    raw = b.getvalue()
    pos = 132  # dataset bytes after the file meta group
    while True:
        hdr = raw[pos:pos + 8]
        if struct.unpack("<H", hdr[:2])[0] != 2:
            return raw[pos:]
        vr = hdr[4:6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            pos += 12 + struct.unpack("<I", raw[pos + 8:pos + 12])[0]
        else:
            pos += 8 + struct.unpack("<H", hdr[6:8])[0]


def stall_store(port: int, *, mid_pdu: bool, sop_uid: str, body: bytes, called: str = "DENTFUSE",
                tls_args=None):
    """Send a C-STORE command and part of its dataset, then go silent."""
    assoc = scu_associate(port, calling="STALLER", called=called, tls_args=tls_args)
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    req.DataSet = io.BytesIO(body)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdus = []
    for prim in msg.encode_msg(cx.context_id, 4096):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        pdus.append(pdu.encode())
    sock = assoc.dul.socket.socket
    for raw in pdus[: len(pdus) // 2]:
        sock.sendall(raw)
    if mid_pdu:
        nxt = pdus[len(pdus) // 2]
        sock.sendall(nxt[: len(nxt) // 2])  # header promises more than ever arrives
    return assoc


def make_pki(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    out: dict[str, Path] = {}

    def write_key(name: str, key) -> None:
        out[name + "_key"] = tmp_path / f"{name}.key"
        out[name + "_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))

    def write_cert(name: str, cert) -> None:
        out[name + "_crt"] = tmp_path / f"{name}.crt"
        out[name + "_crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dentfuse test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write_key("ca", ca_key)
    write_cert("ca", ca)
    for name, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dentfuse {name}")]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if name == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                             x509.DNSName("localhost")]), critical=False)
        write_key(name, key)
        write_cert(name, builder.sign(ca_key, hashes.SHA256()))
    return out


def running_node(tmp_path: Path, network_timeout_s: float) -> Iterator["DicomNode"]:
    """A started DicomNode on an ephemeral port with its data in ``tmp_path / "data"``
    (short timeouts for tests), closed afterwards: ``yield from`` it in a fixture."""
    from dicom_node.server import DicomNode
    from dicom_node.settings import NodeSettings, StabilitySettings

    n = DicomNode(NodeSettings(port=0, network_timeout_s=network_timeout_s, dimse_timeout_s=5.0, acse_timeout_s=5.0),
                  StabilitySettings(check_interval_s=0.1), tmp_path / "data")
    n.start()
    try:
        yield n
    finally:
        n.close()
