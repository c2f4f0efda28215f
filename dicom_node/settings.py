"""Settings of the DICOM node (built by the pipeline's configuration; every field is a
configuration key under ``[node]``, ``[stability]`` or ``[pacs]``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PacsDestination:
    """A DICOM peer we send outputs to (C-STORE) and query priors from (C-FIND/C-MOVE)."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "DENTFUSE"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_ae_titles: tuple[str, ...] = ()  # empty: any calling AE title is accepted
    allowed_peer_addresses: tuple[str, ...] = ()  # empty: any address is accepted
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    maximum_pdu_size: int = 0  # 0 = unlimited
    duplicate_policy: str = "keep_first"  # or "keep_newest"
    tls_certificate: str = ""  # PEM file; with tls_private_key enables DICOM TLS
    tls_private_key: str = ""
    tls_ca_certificates: str = ""  # PEM bundle used to verify client certificates
    tls_require_client_certificate: bool = False


@dataclass(frozen=True)
class StabilitySettings:
    quiet_period_s: float = 60.0
    check_interval_s: float = 1.0


@dataclass(frozen=True)
class PacsSettings:
    destinations: tuple[PacsDestination, ...] = ()
    forward_outputs: bool = True
    forward_max_attempts: int = 10
    forward_backoff_s: float = 5.0
    forward_backoff_max_s: float = 600.0
