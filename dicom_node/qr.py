"""Query and retrieve a patient's prior series from a PACS.

:class:`PacsClient` speaks to one :class:`~dicom_node.settings.PacsDestination`:

- :meth:`PacsClient.find_studies`, :meth:`PacsClient.find_series`,
  :meth:`PacsClient.find_instances`: C-FIND at study, series and image level (Study Root
  by default, Patient Root on request);
- :meth:`PacsClient.find_prior_3d_series`: the patient's 3D series (CT, MR, or a series
  whose instances are of a 3D SOP class such as X-Ray 3D Craniofacial);
- :meth:`PacsClient.move_series`: C-MOVE to an AE title the PACS knows (normally our own
  listener, which stores and indexes what arrives);
- :meth:`PacsClient.get_series`: C-GET on one association; the storage sub-operations
  come back to us on that association and are handed to an ``EVT_C_STORE`` handler (the
  node's own store handler, so they are stored and indexed exactly like a C-STORE).

Both retrieve methods return a :class:`RetrieveResult` listing the SOP instances we now
hold. Identifiers requested from the PACS never include patient names; log lines carry
UIDs and counts only.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pydicom.dataset import Dataset
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.audit import AssociationTally, AuditTrail
from dicom_node.errors import InstanceRejected
from dicom_node.index import InstanceIndex
from dicom_node.ingest import AcceptResult, accept_instance
from dicom_node.scu import (
    MAX_CONTEXTS,
    PacsError,
    PeerRefusedError,
    Timeouts,
    association,
    describe,
    status_category,
)
from dicom_node.settings import PacsDestination
from dicom_node.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, kind_of
from dicom_node.status import Status
from dicom_node.storage import InstanceStore

log = logging.getLogger(__name__)

#: Modalities whose series are volumes (CBCT is sent as CT).
VOLUME_MODALITIES: frozenset[str] = frozenset({"CT", "MR"})

_MODELS = {
    "study": (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
              StudyRootQueryRetrieveInformationModelGet),
    "patient": (PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelMove,
                PatientRootQueryRetrieveInformationModelGet),
}

StoreHandler = Callable[[evt.Event], Any]


@dataclass(frozen=True)
class StudyMatch:
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    modalities_in_study: tuple[str, ...]
    number_of_series: int | None
    number_of_instances: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SeriesMatch:
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str
    series_number: str
    series_description: str
    series_date: str
    number_of_instances: int | None
    sop_class_uids: tuple[str, ...] = ()  # filled by an image-level query when needed

    @property
    def is_3d(self) -> bool:
        """A volume series: CT/MR, or instances of a 3D storage class."""
        if self.sop_class_uids:
            return any(kind_of(c) == "volume" for c in self.sop_class_uids)
        return self.modality.upper() in VOLUME_MODALITIES

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["is_3d"] = self.is_3d
        return d


@dataclass(frozen=True)
class InstanceMatch:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: str


@dataclass(frozen=True)
class RetrieveResult:
    """What a C-MOVE or C-GET of one series brought us.

    ``received`` are the SOP instances we hold after the retrieve (stored and indexed),
    ``missing`` those the PACS listed for the series that we do not hold, ``failed`` those
    the PACS or our store reported as failed.
    """

    method: str  # "C-MOVE" or "C-GET"
    study_instance_uid: str
    series_instance_uid: str
    status: int
    completed: int
    failed_count: int
    warning: int
    expected: tuple[str, ...]
    received: tuple[str, ...]
    missing: tuple[str, ...]
    failed: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return status_category(self.status) in ("success", "warning") and not self.missing and not self.failed

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


def split_patient_key(patient_key: str) -> tuple[str, str]:
    """``"ID^ISSUER"`` (the node's patient key) -> ``("ID", "ISSUER")``; ``"ID"`` -> ``("ID", "")``."""
    pid, _, issuer = patient_key.partition("^")
    return pid, issuer


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword, "")
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or v.__class__.__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def _int(ds: Dataset, keyword: str) -> int | None:
    v = ds.get(keyword, None)
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    v = ds.get(keyword, None)
    if v in (None, ""):
        return ()
    if isinstance(v, str):
        return tuple(x for x in v.split("\\") if x)
    return tuple(str(x) for x in v)


class RetrievedStoreHandler:
    """An ``EVT_C_STORE`` handler for the storage sub-operations of a C-GET.

    Each instance is written (file meta + the dataset bytes exactly as the PACS sent them)
    to a temporary file in the store, fsync'd, then checked, stored and indexed by
    :func:`dicom_node.ingest.accept_instance`, the same path as the listener's C-STORE.
    The handler never raises: failures become DIMSE statuses. With an ``audit`` trail,
    :meth:`finish` (called by :meth:`PacsClient.get_series` when the association ends)
    writes one ``instances_received`` row per study.
    """

    def __init__(self, store: InstanceStore, index: InstanceIndex, *, duplicate_policy: str = "keep_first",
                 audit: AuditTrail | None = None,
                 on_accepted: Callable[[AcceptResult], None] | None = None) -> None:
        self.store = store
        self.index = index
        self.duplicate_policy = duplicate_policy
        self.audit = audit
        self.on_accepted = on_accepted
        self._tally: AssociationTally | None = None

    def __call__(self, event: evt.Event) -> int:
        acceptor = event.assoc.acceptor
        peer_ae = str(getattr(acceptor, "ae_title", "") or "PACS").strip()
        if self.audit is not None and self._tally is None:
            self._tally = AssociationTally(str(event.assoc.requestor.ae_title).strip(), peer_ae,
                                           f"{getattr(acceptor, 'address', '')}:{getattr(acceptor, 'port', '')}")
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        tmp = None
        # With pynetdicom's chunked receive on (the listener turns it on process-wide) the
        # dataset is already in a file that pynetdicom does not remove on the SCU side.
        chunked = getattr(event.request, "_dataset_path", None)
        try:
            tmp, fh = self.store.new_temp_file()
            with fh:
                if chunked is None:
                    fh.write(event.encoded_dataset(include_meta=True))
                else:
                    part = getattr(event.request, "_dataset_file", None)
                    if part is not None:
                        part.close()
                    with open(chunked, "rb") as src:
                        while chunk := src.read(1 << 20):
                            fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            result = accept_instance(
                tmp, self.store, self.index, peer_ae, self.duplicate_policy,
                expected_sop_class_uid=str(event.context.abstract_syntax),
                expected_sop_instance_uid=sop_uid,
            )
        except InstanceRejected as exc:
            log.warning("C-GET sub-operation %s from %s refused: %s", sop_uid, peer_ae, exc.reason)
            self._failed(sop_uid, int(exc.status), exc.reason)
            return int(exc.status)
        except Exception as exc:  # noqa: BLE001 - never raise into pynetdicom
            log.exception("C-GET sub-operation %s from %s failed", sop_uid, peer_ae)
            self._failed(sop_uid, int(Status.PROCESSING_FAILURE), str(exc))
            return int(Status.PROCESSING_FAILURE)
        finally:
            if tmp is not None:
                self.store.discard(tmp)
            if chunked is not None:
                self.store.discard(Path(chunked))
        if self._tally is not None:
            self._tally.ok(result.instance.study_instance_uid, result.instance.patient_key)
        if self.on_accepted is not None:
            try:
                self.on_accepted(result)
            except Exception:  # noqa: BLE001
                log.exception("on_accepted callback failed for %s", sop_uid)
        return 0x0000

    def _failed(self, sop_uid: str, status: int, reason: str) -> None:
        if self._tally is not None:
            self._tally.failed("", {"sop_instance_uid": sop_uid, "status": f"0x{status:04X}", "reason": reason})

    def finish(self) -> None:
        """Write the audit rows of the association that just ended."""
        tally, self._tally = self._tally, None
        if tally is not None and self.audit is not None:
            tally.flush(self.audit)


class PacsClient:
    """C-FIND / C-MOVE / C-GET against one PACS.

    Parameters
    ----------
    calling_ae_title:
        Our AE title (the PACS must know it, and for C-MOVE know where it listens).
    destination:
        The PACS.
    model:
        ``"study"`` (Study Root, default) or ``"patient"`` (Patient Root).
    """

    def __init__(self, calling_ae_title: str, destination: PacsDestination, *, model: str = "study",
                 timeouts: Timeouts = Timeouts(), tls: ssl.SSLContext | None = None) -> None:
        if model not in _MODELS:
            raise PacsError(f"unknown query/retrieve model {model!r}; use 'study' or 'patient'")
        self.calling_ae_title = calling_ae_title
        self.destination = destination
        self.model = model
        self.find_model, self.move_model, self.get_model = _MODELS[model]
        self.timeouts = timeouts
        self.tls = tls

    # -- C-FIND -----------------------------------------------------------------------
    def _find(self, identifier: Dataset) -> list[Dataset]:
        with association(self.calling_ae_title, self.destination, [build_context(self.find_model)],
                         timeouts=self.timeouts, tls=self.tls) as assoc:
            if not assoc.accepted_contexts:
                raise PeerRefusedError(
                    f"{describe(self.destination)} does not accept C-FIND in the {self.model} root model; "
                    "try the other model (--model) or enable queries for our AE title on the PACS"
                )
            out: list[Dataset] = []
            for status, ident in assoc.send_c_find(identifier, self.find_model):
                if "Status" not in status:
                    raise PacsError(
                        f"{describe(self.destination)} stopped answering the C-FIND "
                        "(timeout or aborted association); try again or raise the DIMSE timeout"
                    )
                cat = status_category(int(status.Status))
                if cat == "pending" and ident is not None:
                    out.append(ident)
                elif cat == "failure":
                    raise PacsError(
                        f"{describe(self.destination)} answered the C-FIND with status 0x{int(status.Status):04X}; "
                        "check the query keys and the PACS log"
                    )
            return out

    def _base(self, level: str, patient_id: str | None) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        # Study Root below study level has no patient keys; Patient Root needs the ID.
        if self.model == "patient" or level == "STUDY":
            ds.PatientID = patient_id or ""
        return ds

    def find_studies(self, patient_id: str, *, issuer_of_patient_id: str | None = None,
                     study_date: str = "") -> list[StudyMatch]:
        """Studies of ``patient_id`` (``study_date`` a DICOM date or range, optional).

        ``issuer_of_patient_id`` None lists every study with that ID; a string (``""`` for
        "no issuer") keeps only studies under that issuer: the same ID from another issuer
        is another person. A PACS that reports no issuer for any study cannot be checked;
        its answers are kept (logged), and the pipeline's patient checks still apply to
        what is retrieved.
        """
        if not patient_id:
            raise PacsError("a patient ID is required to query studies (no wildcard queries of a whole PACS)")
        ds = self._base("STUDY", patient_id)
        for kw in ("StudyInstanceUID", "StudyTime", "AccessionNumber", "StudyDescription", "IssuerOfPatientID",
                   "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"):
            setattr(ds, kw, "")
        ds.StudyDate = study_date
        rows = self._find(ds)
        if issuer_of_patient_id is not None:
            issuers = {_text(r, "IssuerOfPatientID") for r in rows}
            if issuers - {""}:
                kept = [r for r in rows if _text(r, "IssuerOfPatientID") == issuer_of_patient_id]
                if len(kept) < len(rows):
                    log.warning("%d stud(ies) with patient ID %s under another issuer skipped on %s",
                                len(rows) - len(kept), patient_id, self.destination.name)
                rows = kept
            elif issuer_of_patient_id:
                log.warning("%s reports no IssuerOfPatientID; studies of %s cannot be checked for issuer %s",
                            self.destination.name, patient_id, issuer_of_patient_id)
        out = [
            StudyMatch(
                study_instance_uid=_text(r, "StudyInstanceUID"), patient_id=_text(r, "PatientID"),
                issuer_of_patient_id=_text(r, "IssuerOfPatientID"),
                study_date=_text(r, "StudyDate"), study_time=_text(r, "StudyTime"),
                accession_number=_text(r, "AccessionNumber"), study_description=_text(r, "StudyDescription"),
                modalities_in_study=_multi(r, "ModalitiesInStudy"),
                number_of_series=_int(r, "NumberOfStudyRelatedSeries"),
                number_of_instances=_int(r, "NumberOfStudyRelatedInstances"),
            )
            for r in rows if _text(r, "StudyInstanceUID")
        ]
        log.info("C-FIND study level on %s: %d stud(ies)", self.destination.name, len(out))
        return sorted(out, key=lambda s: (s.study_date, s.study_time, s.study_instance_uid))

    def find_series(self, study_instance_uid: str, *, patient_id: str | None = None) -> list[SeriesMatch]:
        """Series of one study."""
        ds = self._base("SERIES", patient_id)
        ds.StudyInstanceUID = study_instance_uid
        for kw in ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
                   "NumberOfSeriesRelatedInstances"):
            setattr(ds, kw, "")
        rows = self._find(ds)
        out = [
            SeriesMatch(
                study_instance_uid=_text(r, "StudyInstanceUID") or study_instance_uid,
                series_instance_uid=_text(r, "SeriesInstanceUID"),
                patient_id=_text(r, "PatientID") or (patient_id or ""),
                modality=_text(r, "Modality"), series_number=_text(r, "SeriesNumber"),
                series_description=_text(r, "SeriesDescription"), series_date=_text(r, "SeriesDate"),
                number_of_instances=_int(r, "NumberOfSeriesRelatedInstances"),
            )
            for r in rows if _text(r, "SeriesInstanceUID")
        ]
        log.info("C-FIND series level on %s for study %s: %d series", self.destination.name,
                 study_instance_uid, len(out))
        return out

    def find_instances(self, study_instance_uid: str, series_instance_uid: str, *,
                       patient_id: str | None = None) -> list[InstanceMatch]:
        """Instances of one series (image level)."""
        ds = self._base("IMAGE", patient_id)
        ds.StudyInstanceUID = study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        ds.SOPInstanceUID = ""
        ds.SOPClassUID = ""
        ds.InstanceNumber = ""
        rows = self._find(ds)
        return [InstanceMatch(_text(r, "SOPInstanceUID"), _text(r, "SOPClassUID"), _text(r, "InstanceNumber"))
                for r in rows if _text(r, "SOPInstanceUID")]

    def find_prior_3d_series(self, patient_id: str, *, issuer_of_patient_id: str = "",
                             exclude_study_uids: Iterable[str] = (),
                             exclude_series_uids: Iterable[str] = ()) -> list[SeriesMatch]:
        """The patient's 3D series on the PACS, oldest study first.

        CT and MR series count from their modality; for other modalities the SOP classes
        of the series are asked at image level, so an X-Ray 3D Craniofacial or Enhanced
        series counts and a panoramic (DX/PX) does not.
        """
        skip_studies, skip_series = set(exclude_study_uids), set(exclude_series_uids)
        pid = patient_id if self.model == "patient" else None
        priors: list[SeriesMatch] = []
        for study in self.find_studies(patient_id, issuer_of_patient_id=issuer_of_patient_id):
            if study.study_instance_uid in skip_studies:
                continue
            for s in self.find_series(study.study_instance_uid, patient_id=pid):
                if s.series_instance_uid in skip_series:
                    continue
                if s.modality.upper() not in VOLUME_MODALITIES:
                    classes = sorted({i.sop_class_uid for i in self.find_instances(
                        s.study_instance_uid, s.series_instance_uid, patient_id=pid) if i.sop_class_uid})
                    s = SeriesMatch(**{**s.__dict__, "sop_class_uids": tuple(classes)})
                if s.is_3d:
                    priors.append(s)
        log.info("%d prior 3D series on %s", len(priors), self.destination.name)
        return priors

    def _retrieve_identifier(self, study_instance_uid: str, series_instance_uid: str,
                             patient_id: str | None) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        if self.model == "patient":
            if not patient_id:
                raise PacsError("the Patient Root model needs the patient ID to retrieve a series")
            ds.PatientID = patient_id
        ds.StudyInstanceUID = study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        return ds

    # -- C-MOVE -----------------------------------------------------------------------
    def move_series(self, study_instance_uid: str, series_instance_uid: str, move_destination_ae: str, *,
                    have_instance: Callable[[str], bool], patient_id: str | None = None) -> RetrieveResult:
        """C-MOVE one series to ``move_destination_ae`` (normally our own listener).

        ``have_instance(sop_instance_uid)`` tells whether we now hold an instance (e.g.
        ``lambda uid: index.get(uid) is not None``); our listener answers each sub-operation
        only after the instance is stored and indexed, so when the final C-MOVE response
        arrives the index is complete.

        Raises
        ------
        PeerUnavailableError, PeerRefusedError, PacsError
        """
        expected = tuple(i.sop_instance_uid for i in self.find_instances(
            study_instance_uid, series_instance_uid, patient_id=patient_id))
        ident = self._retrieve_identifier(study_instance_uid, series_instance_uid, patient_id)
        final: Dataset | None = None
        failed_uids: list[str] = []
        with association(self.calling_ae_title, self.destination, [build_context(self.move_model)],
                         timeouts=self.timeouts, tls=self.tls) as assoc:
            if not assoc.accepted_contexts:
                raise PeerRefusedError(
                    f"{describe(self.destination)} does not accept C-MOVE in the {self.model} root model"
                )
            for status, rsp_ident in assoc.send_c_move(ident, move_destination_ae, self.move_model):
                if "Status" not in status:
                    raise PacsError(
                        f"{describe(self.destination)} stopped answering the C-MOVE of series "
                        f"{series_instance_uid}; what arrived is kept; retry to complete it"
                    )
                final = status
                if rsp_ident is not None and "FailedSOPInstanceUIDList" in rsp_ident:
                    failed_uids.extend(_multi(rsp_ident, "FailedSOPInstanceUIDList"))
        if final is None:
            raise PacsError(f"{describe(self.destination)} sent no C-MOVE response for series {series_instance_uid}")
        code = int(final.Status)
        if code == 0xA801:
            raise PeerRefusedError(
                f"{describe(self.destination)} does not know the move destination {move_destination_ae!r}; "
                "add our AE title, host and port to the PACS's list of modalities"
            )
        return self._result("C-MOVE", study_instance_uid, series_instance_uid, final, expected,
                            have_instance, failed_uids)

    # -- C-GET ------------------------------------------------------------------------
    def get_series(self, study_instance_uid: str, series_instance_uid: str, store_handler: StoreHandler, *,
                   have_instance: Callable[[str], bool], patient_id: str | None = None,
                   sop_class_uids: Sequence[str] | None = None) -> RetrieveResult:
        """C-GET one series; each instance arrives on the same association and is passed to
        ``store_handler`` (an ``EVT_C_STORE`` handler returning a status, e.g. the node's).

        We propose, for each SOP class of the series (asked at image level unless
        ``sop_class_uids`` is given), one presentation context per accepted transfer syntax,
        so the PACS can send every instance in the syntax it holds (no transcoding).
        """
        instances = self.find_instances(study_instance_uid, series_instance_uid, patient_id=patient_id)
        expected = tuple(i.sop_instance_uid for i in instances)
        classes = sorted(set(sop_class_uids or ()) | {i.sop_class_uid for i in instances if i.sop_class_uid})
        if not classes:
            classes = sorted(c for c, (_n, k) in STORAGE_SOP_CLASSES.items() if k == "volume")
        contexts = [build_context(self.get_model)]
        roles = []
        per_class = max(1, (MAX_CONTEXTS - 1) // len(classes))
        syntaxes = list(TRANSFER_SYNTAXES)
        for cls in classes:
            if per_class >= len(syntaxes):
                contexts.extend(build_context(cls, ts) for ts in syntaxes)
            else:  # many classes: one context each with every syntax, the PACS picks
                contexts.append(build_context(cls, syntaxes))
            roles.append(build_role(cls, scp_role=True))
        contexts = contexts[:MAX_CONTEXTS]

        failed_local: list[str] = []

        def on_store(event: evt.Event) -> Any:
            rsp = store_handler(event)
            code = int(rsp.Status) if isinstance(rsp, Dataset) else int(rsp)
            if status_category(code) not in ("success", "warning"):
                failed_local.append(str(event.request.AffectedSOPInstanceUID))
            return rsp

        final: Dataset | None = None
        failed_uids: list[str] = []
        ident = self._retrieve_identifier(study_instance_uid, series_instance_uid, patient_id)
        try:
            with association(self.calling_ae_title, self.destination, contexts, timeouts=self.timeouts,
                             tls=self.tls, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
                if not any(cx.abstract_syntax == self.get_model for cx in assoc.accepted_contexts):
                    raise PeerRefusedError(
                        f"{describe(self.destination)} does not accept C-GET in the {self.model} root model; "
                        "use C-MOVE (retrieve --method move)"
                    )
                for status, rsp_ident in assoc.send_c_get(ident, self.get_model):
                    if "Status" not in status:
                        raise PacsError(
                            f"{describe(self.destination)} stopped answering the C-GET of series "
                            f"{series_instance_uid}; what arrived is kept; retry to complete it"
                        )
                    final = status
                    if rsp_ident is not None and "FailedSOPInstanceUIDList" in rsp_ident:
                        failed_uids.extend(_multi(rsp_ident, "FailedSOPInstanceUIDList"))
        finally:
            finish = getattr(store_handler, "finish", None)
            if callable(finish):
                finish()
        if final is None:
            raise PacsError(f"{describe(self.destination)} sent no C-GET response for series {series_instance_uid}")
        return self._result("C-GET", study_instance_uid, series_instance_uid, final, expected,
                            have_instance, failed_uids + failed_local)

    def _result(self, method: str, study: str, series: str, final: Dataset, expected: tuple[str, ...],
                have_instance: Callable[[str], bool], failed: Sequence[str]) -> RetrieveResult:
        held = tuple(u for u in expected if have_instance(u))
        missing = tuple(u for u in expected if u not in set(held))
        failed_set = tuple(sorted(set(failed)))
        res = RetrieveResult(
            method=method, study_instance_uid=study, series_instance_uid=series, status=int(final.Status),
            completed=_int(final, "NumberOfCompletedSuboperations") or 0,
            failed_count=_int(final, "NumberOfFailedSuboperations") or 0,
            warning=_int(final, "NumberOfWarningSuboperations") or 0,
            expected=expected, received=held, missing=missing, failed=failed_set,
        )
        if method == "C-MOVE" and status_category(res.status) == "failure" and not held:
            log.warning("C-MOVE of series %s from %s failed with nothing received; check that the PACS "
                        "knows our AE title, host and port as a move destination", series,
                        self.destination.name)
        log_fn = log.info if res.ok else log.warning
        log_fn("%s of series %s from %s: status 0x%04X, %d of %d instance(s) held, %d missing, %d failed",
               method, series, self.destination.name, res.status, len(held), len(expected), len(missing),
               len(failed_set))
        return res
