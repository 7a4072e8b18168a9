"""Real servers for the PACS tests: Orthanc with its DICOMweb plugin, and a throw-away PostgreSQL cluster.

Both come from Debian's packages (`.ci/run` installs `orthanc`, `orthanc-dicomweb` and `postgresql`) and run
from temporary folders on free loopback ports; where a binary is absent the tests skip with the reason.
Nothing is mocked: the PACS tests talk to these servers over HTTP and SQL.

Orthanc is started from its binary (the package's service unit does not run here) with a generated
configuration: authentication on with one registered user, remote access off, the DICOMweb plugin from the
package's plugin folder, storage and index in the temporary folder. Its DICOM (DIMSE) listener stays off:
Orthanc 1.10 cannot bind it to loopback alone, and lungscreen speaks DICOMweb only. PostgreSQL runs as an
unprivileged user (``initdb`` refuses root): the current user, or ``nobody`` when the tests run as root.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ORTHANC_USER, ORTHANC_PASSWORD = "lungscreen", "s3cret-pacs"
ORTHANC_BINARIES = ("Orthanc", "/usr/sbin/Orthanc")
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def orthanc_missing() -> str:
    """Why Orthanc cannot run here ('' when it can)."""
    if orthanc_binary() is None:
        return "the Orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return ""


def orthanc_binary() -> str | None:
    return next((found for name in ORTHANC_BINARIES if (found := shutil.which(name))), None)


def dicomweb_plugin() -> str | None:
    return next((path for pattern in DICOMWEB_PLUGINS for path in sorted(glob.glob(pattern))), None)


class Orthanc:
    """An Orthanc server on a free loopback port, its storage in ``folder`` (kept across :meth:`kill` and
    :meth:`start`, so a restart finds what was stored)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.root}/dicom-web"
        self.auth = (ORTHANC_USER, ORTHANC_PASSWORD)
        self.process: subprocess.Popen | None = None
        config = {
            "Name": "lungscreen-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "Plugins": [dicomweb_plugin()], "HttpThreadsCount": 8, "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))

    def start(self, timeout: float = 30.0) -> Orthanc:
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([orthanc_binary(), str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                if requests.get(f"{self.root}/system", auth=self.auth, timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer GET /system within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no chance to flush or close anything."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file through Orthanc's own REST API (not lungscreen's client)."""
        response = requests.post(f"{self.root}/instances", data=data, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def instances(self, study: str, **filters: str) -> list[dict]:
        """QIDO-RS through Orthanc's DICOMweb, as DICOM JSON."""
        response = requests.get(f"{self.dicomweb}/studies/{study}/instances", params=filters, auth=self.auth, timeout=30,
                                headers={"Accept": "application/dicom+json"})
        response.raise_for_status()
        return response.json() if response.content else []

    def retrieve(self, study: str, series: str, instance: str):
        """WADO-RS through Orthanc's DICOMweb (dicomweb-client only decodes the multipart answer)."""
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.auth = self.auth
        return DICOMwebClient(self.dicomweb, session=session).retrieve_instance(study, series, instance)

    def wipe(self) -> None:
        """Delete every patient (between tests sharing one server)."""
        for patient in requests.get(f"{self.root}/patients", auth=self.auth, timeout=30).json():
            requests.delete(f"{self.root}/patients/{patient}", auth=self.auth, timeout=30).raise_for_status()


def postgres_missing() -> str:
    if postgres_bin() is None:
        return "PostgreSQL's initdb / pg_ctl are not installed (apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start PostgreSQL as an unprivileged user"
    return ""


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class Postgres:
    """A PostgreSQL cluster in a temporary folder on a free loopback port, trusting local connections (a throw-away
    test database: no password), run by an unprivileged user."""

    def __init__(self) -> None:
        import tempfile

        # its own folder under the system's temporary root, which the unprivileged user can walk into
        self.folder = Path(tempfile.mkdtemp(prefix="lungscreen-postgres-"))
        self.port = free_port()
        self.data = self.folder / "data"
        self.user = "nobody" if os.geteuid() == 0 else None
        self.url = f"postgresql://lungscreen@127.0.0.1:{self.port}/screening"

    def _run(self, *command: str | Path) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run([*prefix, *map(str, command)], check=True, capture_output=True, cwd="/", timeout=120)

    def start(self) -> Postgres:
        binaries = postgres_bin()
        self.data.mkdir()
        if self.user:
            for path in (self.folder, self.data):
                shutil.chown(path, self.user)
        self._run(binaries / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self._run(binaries / "pg_ctl", "-D", self.data, "-l", self.data / "server.log", "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._run(binaries / "psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-d", "postgres",
                  "-c", "CREATE ROLE lungscreen LOGIN", "-c", "CREATE DATABASE screening OWNER lungscreen")
        return self

    def stop(self) -> None:
        binaries = postgres_bin()
        if (self.data / "postmaster.pid").exists():
            self._run(binaries / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
