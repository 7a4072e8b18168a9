"""One DICOMweb server: QIDO-RS searches, WADO-RS retrieval and STOW-RS storage through ``dicomweb-client``.

The HTTP session is where the network policy lives: credentials (HTTP basic or a bearer token, taken from
the environment or a file, never from a command line that ``ps`` shows), TLS verification on (a hospital's
own CA through ``ca_bundle``), a connect and a read timeout, and retries with exponential backoff on
connection errors and 5xx answers (never on a 4xx: a wrong password or an unknown study stays wrong). Every
failure reaches the caller as a :class:`PacsError` whose message is one line naming the server and the fix;
:class:`PacsUnavailable` marks the transient ones (unreachable, 5xx after the retries), which a watching
screener waits out instead of blaming the instance.

Searches ask for every match in one answer, without ``offset`` paging: Orthanc's DICOMweb plugin (1.7, Debian
12) ignores ``offset`` when filtering on ``ModalitiesInStudy`` (paging then never ends). QIDO answers are
kept as DICOM JSON (``{"0020000D": {"vr": "UI", "Value": [...]}}``); :func:`tag` reads one
value by keyword. Patient names and IDs arrive in those answers (a PACS sends them) and are never printed.

Example:
    >>> pacs = Pacs("https://pacs.example.org/dicom-web", Credentials.from_environment())   # doctest: +SKIP
    >>> [tag(study, "StudyInstanceUID") for study in pacs.studies(modalities=["CR", "DX"])]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lungscreen.errors import ConfigError, LungscreenError

#: Environment variables the credentials come from (a file: ``credentials``).
USER_VARIABLE, PASSWORD_VARIABLE, TOKEN_VARIABLE = "LUNGSCREEN_PACS_USER", "LUNGSCREEN_PACS_PASSWORD", "LUNGSCREEN_PACS_TOKEN"
#: HTTP answers worth another try: the server's own trouble, never the request's (4xx).
RETRY_STATUSES = (500, 502, 503, 504)
#: A DICOM UID: digits and dots, at most 64 characters (the only server text ever used in a file name).
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class PacsError(LungscreenError):
    """The PACS answered something the command cannot use: refused credentials, an unknown study, not DICOMweb."""


class PacsUnavailable(PacsError):
    """The PACS could not be reached or failed on its side (5xx) after the retries: worth trying again later."""


@dataclass(frozen=True)
class Credentials:
    """How to authenticate: HTTP basic (``user`` and ``password``), a bearer ``token``, or nothing."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    @classmethod
    def from_environment(cls, file: Path | None = None) -> Credentials:
        """From ``file`` (its first line: ``USER:PASSWORD``, or ``Bearer TOKEN``) when given, else from
        ``$LUNGSCREEN_PACS_TOKEN`` or ``$LUNGSCREEN_PACS_USER`` + ``$LUNGSCREEN_PACS_PASSWORD``."""
        if file is not None:
            try:
                line = file.read_text(encoding="utf-8").splitlines()[0].strip() if file.stat().st_size else ""
            except OSError as error:
                raise ConfigError(f"--credentials: cannot read {file} ({error.strerror or error})") from None
            if line.lower().startswith("bearer "):
                return cls(token=line[7:].strip())
            user, colon, password = line.partition(":")
            if not colon or not user:
                raise ConfigError(f"--credentials: {file} must hold USER:PASSWORD or 'Bearer TOKEN' on its first line")
            return cls(user=user, password=password)
        if os.environ.get(TOKEN_VARIABLE):
            return cls(token=os.environ[TOKEN_VARIABLE])
        if os.environ.get(USER_VARIABLE):
            return cls(user=os.environ[USER_VARIABLE], password=os.environ.get(PASSWORD_VARIABLE, ""))
        return cls()

    def apply(self, session: Any) -> None:
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.user:
            session.auth = (self.user, self.password or "")


def tag(item: dict[str, Any], keyword: str, default: Any = None) -> Any:
    """The first value of ``keyword`` in a DICOM JSON object (QIDO answer or WADO metadata), or ``default``."""
    from pydicom.datadict import tag_for_keyword

    number = tag_for_keyword(keyword)
    element = item.get(f"{number:08X}") if number is not None else None
    values = (element or {}).get("Value") or []
    return values[0] if values else default


def check_uid(text: str, what: str) -> str:
    """``text`` if it is a valid DICOM UID, else a :class:`ConfigError` naming ``what``."""
    if len(text) > 64 or not UID.match(text):
        raise ConfigError(f"{what}: {text!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return text


class Pacs:
    """A DICOMweb service (its root, e.g. ``http://127.0.0.1:8042/dicom-web`` for Orthanc).

    Args:
        url: the DICOMweb root; credentials in it are refused (a command line shows them).
        credentials: see :class:`Credentials`.
        ca_bundle: a PEM file of the CAs to trust for TLS (default: the system's); verification is never off.
        timeout: seconds to connect and to wait for an answer.
        retries: further tries after a connection error or a 5xx, with backoff 0.5, 1, 2, ... s.
    """

    def __init__(self, url: str, credentials: Credentials | None = None, *, ca_bundle: Path | None = None,
                 timeout: tuple[float, float] = (5.0, 120.0), retries: int = 4) -> None:
        import requests
        from dicomweb_client import DICOMwebClient
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"URL: {url!r} is not an http(s) address of a DICOMweb service "
                              "(e.g. http://127.0.0.1:8042/dicom-web)")
        if parts.username or parts.password:
            raise ConfigError("URL: credentials in the address would show in `ps` and in logs; set "
                              f"${USER_VARIABLE} and ${PASSWORD_VARIABLE} (or ${TOKEN_VARIABLE}, or --credentials FILE)")
        self.url = url.rstrip("/")
        self.shown = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        session = requests.Session()
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0, backoff_factor=0.5,
                      status_forcelist=RETRY_STATUSES, allowed_methods=None,  # STOW too: our UIDs make it idempotent
                      raise_on_status=False, respect_retry_after_header=True)
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.verify = str(ca_bundle) if ca_bundle is not None else True
        (credentials or Credentials()).apply(session)
        self._media = ""
        session.hooks["response"].append(self._remember_media)
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # one retry policy: the session's

    # ----- QIDO-RS -------------------------------------------------------------------------------

    def studies(self, *, modalities: Sequence[str] = (), since: str | None = None,
                study: str | None = None) -> list[dict[str, Any]]:
        """Studies holding any of ``modalities`` (all when empty), from StudyDate ``since`` (YYYYMMDD) on."""
        filters: dict[str, Any] = {}
        if since:
            filters["StudyDate"] = f"{since}-"
        if study:
            filters["StudyInstanceUID"] = study
        found: dict[str, dict[str, Any]] = {}
        for modality in modalities or [None]:
            query = {**filters, **({"ModalitiesInStudy": modality} if modality else {})}
            with self._translated("search for studies"):
                answer = self.client.search_for_studies(search_filters=query)
            for item in self._checked(answer, "StudyInstanceUID"):
                found.setdefault(tag(item, "StudyInstanceUID"), item)
        return list(found.values())

    def series(self, study: str) -> list[dict[str, Any]]:
        with self._translated(f"list the series of study {study}", study=study):
            return self._checked(self.client.search_for_series(study), "SeriesInstanceUID")

    def instances(self, study: str, **filters: str) -> list[dict[str, Any]]:
        with self._translated(f"search the instances of study {study}", study=study):
            answer = self.client.search_for_instances(study, search_filters=filters or None)
        return self._checked(answer, "SOPInstanceUID")

    # ----- WADO-RS / STOW-RS ---------------------------------------------------------------------

    def metadata(self, study: str, series: str) -> list[dict[str, Any]]:
        """Every instance's header in a series (DICOM JSON, pixel data by reference only)."""
        with self._translated(f"read the metadata of series {series}", study=study):
            return self._checked(self.client.retrieve_series_metadata(study, series), "SOPInstanceUID")

    def retrieve(self, study: str, series: str, instance: str) -> bytes:
        """One instance as a DICOM Part 10 file's bytes (what ``read_image`` and ``pydicom`` read)."""
        import pydicom

        with self._translated(f"retrieve instance {instance}", study=study):
            dataset = self.client.retrieve_instance(study, series, instance)
        return part10(dataset, pydicom)

    def study_instances(self, study: str) -> Iterator[Any]:
        """Every instance of a study, as pydicom datasets, one at a time."""
        with self._translated(f"retrieve study {study}", study=study):
            yield from self.client.iter_study(study)

    def store(self, datasets: Sequence[Any]) -> None:
        """STOW-RS ``datasets`` (each written as a Part 10 file, with its 128-byte preamble: without one
        Orthanc keeps a bare stream that fails on retrieval); every one must be accepted."""
        for dataset in datasets:
            dataset.preamble = b"\0" * 128
        with self._translated("store the results"):
            answer = self.client.store_instances(list(datasets))
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')} (reason {item.get('FailureReason', '?')})"
                                for item in failed)
            raise PacsError(f"{self.shown} refused to store {reasons}")

    # ----- errors ----------------------------------------------------------------------------------

    def _remember_media(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self._media = "" if response.status_code == 204 or not response.content else \
            response.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def _checked(self, answer: Any, key: str) -> list[dict[str, Any]]:
        """A QIDO/metadata answer, or a PacsError when it is not a list of DICOM JSON objects holding ``key``
        (a web server that is not DICOMweb, such as Orthanc's own REST API, answers something else: a list
        of its own IDs, or an empty list as plain ``application/json`` where DICOMweb says ``dicom+json``)."""
        empty_but_not_dicom = answer == [] and self._media not in ("", "application/dicom+json")
        if empty_but_not_dicom or not isinstance(answer, list) or any(
                not isinstance(item, dict) or tag(item, key) is None for item in answer):
            raise PacsError(f"{self.shown} does not answer as a DICOMweb service (QIDO-RS); give its DICOMweb root, "
                            "e.g. http://127.0.0.1:8042/dicom-web for Orthanc")
        return answer

    @contextlib.contextmanager
    def _translated(self, doing: str, *, study: str | None = None) -> Iterator[None]:
        """Turn the HTTP stack's exceptions into one-line PacsErrors."""
        import requests

        try:
            yield
        except requests.exceptions.SSLError as error:
            raise PacsError(f"{self.shown}: TLS certificate not trusted ({_reason(error)}); give your CA with "
                            "--ca-bundle FILE") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
            raise PacsUnavailable(f"cannot reach {self.shown} to {doing} ({_reason(error)})") from None
        except requests.exceptions.HTTPError as error:
            raise _http_error(self.shown, doing, error.response, study) from None
        except (ValueError, KeyError) as error:  # a body that is not DICOM JSON / multipart DICOM
            raise PacsError(f"{self.shown} does not answer as a DICOMweb service when asked to {doing} "
                            f"({str(error).splitlines()[0][:120]})") from None


def part10(dataset: Any, pydicom: Any) -> bytes:
    """A dataset as a DICOM Part 10 file (preamble, "DICM", file meta)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _http_error(shown: str, doing: str, response: Any, study: str | None) -> PacsError:
    status = getattr(response, "status_code", 0)
    if status >= 500:
        return PacsUnavailable(f"{shown} failed to {doing} (HTTP {status}, after retries)")
    if status in (401, 403):
        return PacsError(f"{shown} refused the credentials (HTTP {status}): set ${USER_VARIABLE} and "
                         f"${PASSWORD_VARIABLE}, or ${TOKEN_VARIABLE}, or --credentials FILE")
    if status == 404 and study is not None:
        return PacsError(f"{shown} has no study {study} (HTTP 404)")
    if status == 404:
        return PacsError(f"{shown} does not answer as a DICOMweb service (HTTP 404 to {doing}); give its DICOMweb "
                         "root, e.g. http://127.0.0.1:8042/dicom-web for Orthanc")
    return PacsError(f"{shown} refused to {doing} (HTTP {status})")


def _reason(error: Exception) -> str:
    """The innermost cause of a requests/urllib3 error in a few words ("connection refused", "timed out")."""
    text = str(error)
    for pattern, said in (("refused", "connection refused"), ("timed out", "timed out"), ("Name or service", "unknown host"),
                          ("No route", "no route to host"), ("certificate verify failed", "certificate verify failed"),
                          ("Temporary failure in name resolution", "unknown host")):
        if pattern in text:
            return said
    return text.splitlines()[0][:160]
