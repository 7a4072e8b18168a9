"""Screening inside the hospital: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against a PACS, with a state database.

- :mod:`~lungscreen.pacs.connection`: one DICOMweb server through ``dicomweb-client`` (credentials, TLS,
  timeouts, retries), its failures as one-line :class:`PacsError`;
- :mod:`~lungscreen.pacs.selection`: which instances a model takes, from their headers;
- :mod:`~lungscreen.pacs.documents`: the Structured Report and the Secondary Capture overlay (highdicom);
- :mod:`~lungscreen.pacs.state`: the SQLAlchemy state (SQLite or a shared PostgreSQL), atomic leased claims;
- :mod:`~lungscreen.pacs.screener`: the scan / claim / screen / store / mark cycle, and ``--watch``;
- :mod:`~lungscreen.pacs.workers`: several worker processes on one state;
- :mod:`~lungscreen.pacs.pull`: a study as DICOM files.

An image's answer comes from :func:`lungscreen.audit.screening.screen_image`; nothing here trains.
"""

from lungscreen.pacs.connection import Credentials, Pacs, PacsError, PacsUnavailable
from lungscreen.pacs.screener import Options, Outcome, Screener, Tally
from lungscreen.pacs.state import State, state_url

__all__ = ["Credentials", "Options", "Outcome", "Pacs", "PacsError", "PacsUnavailable", "Screener", "State", "Tally",
           "state_url"]
