"""Fetch the public COVID-19 / pneumonia chest-image sources into one data folder.

Each source of :data:`CATALOGUE` says how it is published:

* ``git``: a GitHub repository, fetched with ``git clone --depth 1`` (no shell; the URL comes from the
  catalogue or from an explicit override such as a mirror or a ``file://`` copy);
* ``kaggle-dataset`` / ``kaggle-competition``: fetched with the ``kaggle`` command line when it is
  installed and has an API token, otherwise the user gets the exact steps to do by hand;
* ``manual``: behind a click-through page; the user gets the URL and where to put the files.

Nothing is ever half-written: every download goes into a hidden folder beside its target
(``DIR/.<folder>.partial-XXXX``) and is renamed into place only once complete; a failure removes it. An
existing target is left alone unless ``force`` is given. Target folder names are those
``lungscreen data build`` and the data README use (``cohen-covid-chestxray``, ...).

Example:
    >>> results = download(["cohen"], "data")                  # doctest: +SKIP
    >>> results[0].status, results[0].path.name                # doctest: +SKIP
    ('downloaded', 'cohen-covid-chestxray')
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lungscreen.errors import ConfigError, SourceError

__all__ = ["CATALOGUE", "DownloadResult", "Source", "download", "download_source", "get_entry", "parse_url_overrides"]

GIT, KAGGLE_DATASET, KAGGLE_COMPETITION, MANUAL = "git", "kaggle-dataset", "kaggle-competition", "manual"

#: progress(source name, phase, percent or None) - phases are git's ("Receiving objects", ...) or ours.
Progress = Callable[[str, str, "float | None"], None]


@dataclass(frozen=True)
class Source:
    """One public source and how to fetch it.

    Attributes:
        name: short name used on the command line.
        title: what it is.
        method: ``git``, ``kaggle-dataset``, ``kaggle-competition`` or ``manual``.
        location: clone URL, Kaggle slug (``owner/dataset`` or competition name), or download page.
        folder: folder created under the data directory.
        licence: as published.
        page: page a person reads (terms, manual download).
        steps: what to do by hand (manual sources, and Kaggle sources without the Kaggle CLI).
        unzip: archives inside the download to extract in place (glob patterns, relative to the folder).
    """

    name: str
    title: str
    method: str
    location: str
    folder: str
    licence: str
    page: str
    steps: str = ""
    unzip: tuple[str, ...] = ()


CATALOGUE: dict[str, Source] = {s.name: s for s in (
    Source("cohen", "Cohen et al., COVID-19 image data collection", GIT,
           "https://github.com/ieee8023/covid-chestxray-dataset.git", "cohen-covid-chestxray",
           "per image (metadata.csv `license` column)", "https://github.com/ieee8023/covid-chestxray-dataset"),
    Source("figure1", "Figure 1 COVID-19 chest X-ray dataset initiative", GIT,
           "https://github.com/agchung/Figure1-COVID-chestxray-dataset.git", "figure1-covid-chestxray",
           "see the repository README", "https://github.com/agchung/Figure1-COVID-chestxray-dataset"),
    Source("actualmed", "Actualmed COVID-19 chest X-ray dataset initiative", GIT,
           "https://github.com/agchung/Actualmed-COVID-chestxray-dataset.git", "actualmed-covid-chestxray",
           "see the repository README", "https://github.com/agchung/Actualmed-COVID-chestxray-dataset"),
    Source("v7labs", "V7 Labs lung segmentations of the Cohen images", GIT,
           "https://github.com/v7labs/covid-19-xray-dataset.git", "v7labs-covid-xray", "CC BY 4.0",
           "https://github.com/v7labs/covid-19-xray-dataset"),
    Source("covid-ct", "COVID-CT (Zhao et al., UCSD-AI4H), CT slices", GIT,
           "https://github.com/UCSD-AI4H/COVID-CT.git", "ucsd-covid-ct", "research use, per the source",
           "https://github.com/UCSD-AI4H/COVID-CT", unzip=("Images-processed/*.zip",)),
    Source("openist", "OpenIST chest X-rays with lung masks (name@.png)", GIT,
           "https://github.com/pi-null-mezon/OpenIST.git", "openist-lung-masks", "none stated",
           "https://github.com/pi-null-mezon/OpenIST"),
    Source("rsna", "RSNA Pneumonia Detection Challenge (DICOM + stage_2_train_labels.csv)", KAGGLE_COMPETITION,
           "rsna-pneumonia-detection-challenge", "rsna-pneumonia", "RSNA challenge terms (accept them on Kaggle first)",
           "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data"),
    Source("radiography", "COVID-19 Radiography Database (Chowdhury et al., Rahman et al.)", KAGGLE_DATASET,
           "tawsifurrahman/covid19-radiography-database", "covid19-radiography-database", "see the Kaggle page",
           "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database"),
    Source("kermany", "Kermany et al., pediatric chest X-ray pneumonia (chest_xray/{train,test,val})", KAGGLE_DATASET,
           "paultimothymooney/chest-xray-pneumonia", "kermany-chest-xray", "CC BY 4.0",
           "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia"),
    Source("nih", "NIH ChestX-ray14 (Data_Entry_2017.csv, BBox_List_2017.csv, images/)", MANUAL,
           "https://nihcc.app.box.com/v/ChestXray-NIHCC", "nih-chestxray14", "no restriction stated; cite NIH",
           "https://nihcc.app.box.com/v/ChestXray-NIHCC",
           steps="Open https://nihcc.app.box.com/v/ChestXray-NIHCC and download Data_Entry_2017_v2020.csv (or "
                 "Data_Entry_2017.csv), BBox_List_2017.csv and images/images_001.tar.gz ... images_012.tar.gz "
                 "(batch_download_zips.py on that page fetches the twelve archives). Extract every archive so the "
                 "PNGs land in {target}/images/ and put both CSV files in {target}/."),
    Source("montgomery", "Montgomery County chest X-ray set (CXR_png, ManualMask/{leftMask,rightMask})", MANUAL,
           "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/Montgomery-County-CXR-Set/MontgomerySet/index.html",
           "montgomery", "NLM: free for research, cite Jaeger et al. 2014",
           "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets",
           steps="Download the Montgomery County set from "
                 "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/Montgomery-County-CXR-Set/"
                 "MontgomerySet/index.html (or NLM-MontgomeryCXRSet.zip from the LHNCBC downloads page) and extract "
                 "it so that {target}/CXR_png/ and {target}/ManualMask/leftMask/, rightMask/ exist."),
    Source("shenzhen", "Shenzhen No. 3 Hospital chest X-ray set (CXR_png) with lung masks", MANUAL,
           "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/Shenzhen-Hospital-CXR-Set/index.html",
           "shenzhen", "NLM: free for research, cite Jaeger et al. 2014",
           "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets",
           steps="Download the Shenzhen set from "
                 "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/Shenzhen-Hospital-CXR-Set/"
                 "index.html (ChinaSet_AllFiles.zip) and extract it so that {target}/CXR_png/ exists; its lung masks "
                 "are published separately (Stirenko et al.: https://www.kaggle.com/datasets/yoctoman/shcxr-lung-mask): "
                 "put them in {target}/ManualMask/."),
)}


@dataclass(frozen=True)
class DownloadResult:
    """What happened to one source.

    Attributes:
        name: the source.
        status: ``downloaded``, ``present`` (left alone), ``manual`` (steps to do by hand) or ``failed``.
        path: its folder under the data directory.
        message: one line (or, for ``manual``, the steps).
    """

    name: str
    status: str
    path: Path
    message: str

    @property
    def ok(self) -> bool:
        """False only for a failed download."""
        return self.status != "failed"


def get_entry(name: str) -> Source:
    """A catalogue entry by name, with the known names in the error."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; known: {', '.join(CATALOGUE)}") from None


def parse_url_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """``["cohen=file:///mirror/cohen"]`` -> ``{"cohen": "file:///mirror/cohen"}``, checking names and URLs."""
    overrides = {}
    for pair in pairs:
        name, separator, url = pair.partition("=")
        if not separator or not name.strip() or not url.strip():
            raise ConfigError(f"--url expects NAME=URL, got {pair!r}")
        get_entry(name.strip())
        overrides[name.strip()] = _checked_url(url.strip())
    return overrides


def download(names: Sequence[str], to: str | Path, *, urls: Mapping[str, str] | None = None, force: bool = False,
             progress: Progress | None = None) -> list[DownloadResult]:
    """Fetch each named source into ``to/<folder>``; one source's failure does not stop the others.

    Args:
        names: catalogue names (checked all before anything is fetched).
        to: the data directory (created if needed).
        urls: name -> URL to clone instead of the catalogue's (a mirror, a fork, a ``file://`` copy).
        force: replace a folder that is already there (the old one stays until the new one is complete).
        progress: called with (name, phase, percent) while fetching.

    Raises:
        SourceError: an unknown name (nothing is fetched then).
        ConfigError: no name, or a URL override that is not a clone URL.
    """
    entries = [get_entry(name) for name in dict.fromkeys(names)]
    if not entries:
        raise ConfigError("name at least one source to download (lungscreen data download --list shows them)")
    urls = {name: _checked_url(url) for name, url in (urls or {}).items()}
    for name in urls:
        get_entry(name)
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    return [download_source(entry, to, url=urls.get(entry.name), force=force, progress=progress) for entry in entries]


def download_source(entry: Source, to: Path, *, url: str | None = None, force: bool = False,
                    progress: Progress | None = None) -> DownloadResult:
    """Fetch one source into ``to/entry.folder`` (see :func:`download`)."""
    target = to / entry.folder
    if target.exists() and not force:
        return DownloadResult(entry.name, "present", target, "already there, left alone (--force replaces it)")
    if url is None and entry.method == MANUAL:
        return DownloadResult(entry.name, "manual", target, entry.steps.format(target=target))
    if url is None and entry.method in (KAGGLE_DATASET, KAGGLE_COMPETITION):
        missing = _kaggle_missing()
        if missing:
            return DownloadResult(entry.name, "manual", target, _kaggle_steps(entry, target, missing))

    def report(phase: str, percent: float | None) -> None:
        if progress is not None:
            progress(entry.name, phase, percent)

    staging = Path(tempfile.mkdtemp(prefix=f".{entry.folder}.partial-", dir=to))
    try:
        if url is not None or entry.method == GIT:
            _git_clone(url or entry.location, staging, report)
        else:
            _kaggle_download(entry, staging, report)
        for pattern in entry.unzip:
            for archive in sorted(staging.glob(pattern)):
                _extract(archive, staging)
        _move_into_place(staging, target)
    except SourceError as error:
        shutil.rmtree(staging, ignore_errors=True)
        return DownloadResult(entry.name, "failed", target, str(error))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DownloadResult(entry.name, "downloaded", target, f"from {url or entry.location}")


# --- git ---------------------------------------------------------------------------------------------------

_URL = re.compile(r"^(https?|ssh|git|file)://\S+$|^[\w.-]+@[\w.-]+:\S+$")
_PROGRESS = re.compile(rb"([A-Za-z][A-Za-z ]+):\s+(\d{1,3})%")  # git: "Receiving objects:  45% (9/20)"


def _checked_url(url: str) -> str:
    """Accept http(s)/ssh/git/file URLs and scp-like ``user@host:path``; never something git reads as an option."""
    if url.startswith("-") or not _URL.match(url):
        raise ConfigError(f"not a clone URL: {url!r} (use https://, ssh://, git://, file:// or user@host:path)")
    return url


def _git_clone(url: str, destination: Path, progress: Callable[[str, float | None], object]) -> None:
    """``git clone --depth 1`` into ``destination`` (an empty folder), reporting git's progress lines."""
    git = shutil.which("git")
    if git is None:
        raise SourceError("git is not installed; install it (e.g. apt-get install git) or download by hand")
    command = [git, "-c", "protocol.ext.allow=never", "clone", "--depth", "1", "--progress", "--", url, str(destination)]
    environment = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
    tail = _run(command, environment, progress)
    if tail is not None:
        raise SourceError(f"git clone {url} failed: {tail}")


def _run(command: list[str], environment: dict[str, str], progress: Callable[[str, float | None], object]) -> str | None:
    """Run without a shell, forwarding "<phase>: NN%" lines; return None on success, else the last message."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=environment)
    lines: deque[bytes] = deque(maxlen=50)  # a long download prints thousands of progress lines
    pending = b""
    assert process.stdout is not None
    for chunk in iter(lambda: process.stdout.read1(4096), b""):
        pending += chunk
        *complete, pending = re.split(rb"[\r\n]", pending)
        for line in filter(None, (piece.strip() for piece in complete)):
            match = _PROGRESS.search(line)
            if match:
                progress(match.group(1).decode(errors="replace").strip(), float(match.group(2)))
            else:
                lines.append(line)
    if pending.strip():
        lines.append(pending.strip())
    if process.wait() == 0:
        return None
    text = [line.decode(errors="replace") for line in lines]
    errors = [line for line in text if line.lower().startswith(("fatal:", "error:"))]
    return " / ".join(errors[:2] or text[-3:]) or f"exit code {process.returncode}"


# --- kaggle ------------------------------------------------------------------------------------------------


def _kaggle_missing() -> str:
    """Why the Kaggle CLI cannot run here, or "" when it is installed and has an API token configured."""
    if shutil.which("kaggle") is None:
        return "the Kaggle command line is not installed"
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return ""
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    if (folder / "kaggle.json").is_file() or (folder / "access_token").is_file():
        return ""
    return f"the Kaggle command line has no API token ({folder / 'kaggle.json'} is missing)"


def _kaggle_steps(entry: Source, target: Path, reason: str) -> str:
    archive = entry.location.split("/")[-1] + ".zip"
    rules = " and accept the competition rules on its page" if entry.method == KAGGLE_COMPETITION else ""
    return (f"{reason}. Either: pip install kaggle, create an API token (kaggle.com > Settings > API > Create New "
            f"Token) saved as ~/.kaggle/kaggle.json{rules}, then run this command again; or download {archive} by "
            f"hand from {entry.page} and unzip it into {target}/.")


def _kaggle_download(entry: Source, destination: Path, progress: Callable[[str, float | None], object]) -> None:
    kind = ["competitions", "download", "-c"] if entry.method == KAGGLE_COMPETITION else ["datasets", "download", "-d"]
    command = [str(shutil.which("kaggle")), *kind, entry.location, "-p", str(destination)]
    progress("Kaggle download", None)
    tail = _run(command, dict(os.environ), progress)
    if tail is not None:
        raise SourceError(f"kaggle download of {entry.location} failed: {tail}")
    archives = sorted(destination.glob("*.zip"))
    if not archives:
        raise SourceError(f"kaggle download of {entry.location} produced no archive")
    for archive in archives:
        progress(f"Extracting {archive.name}", None)
        _extract(archive, destination)
        archive.unlink()


def _extract(archive: Path, destination: Path) -> None:
    """Extract a zip inside the staging folder (zipfile drops absolute paths and '..' components)."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(destination)
    except (zipfile.BadZipFile, OSError) as error:
        raise SourceError(f"{archive.name}: cannot extract ({error})") from None


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished download onto ``target``; an older copy is removed only after the rename."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
