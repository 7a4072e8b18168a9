"""``pacs pull``: a study's instances as DICOM files, under the folder the user chose and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lungscreen.io.files import atomic_path
from lungscreen.pacs.connection import Pacs, check_uid


def pull_study(pacs: Pacs, study: str, folder: Path, *, progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write every instance of ``study`` as ``FOLDER/STUDY/SERIES/INSTANCE.dcm`` (Part 10, with preamble).

    File names are the UIDs alone (no patient name ever reaches the file system), each checked to be a DICOM
    UID before it becomes a path; each file is written whole or not at all.

    Raises:
        PacsError: no such study, or the PACS cannot be used.
    """
    import pydicom

    check_uid(study, "STUDY_UID")
    written = []
    for dataset in pacs.study_instances(study):
        series = check_uid(str(dataset.SeriesInstanceUID), "a SeriesInstanceUID the PACS sent")
        instance = check_uid(str(dataset.SOPInstanceUID), "a SOPInstanceUID the PACS sent")
        target = folder / study / series / f"{instance}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as temporary:
            pydicom.dcmwrite(temporary, dataset, enforce_file_format=True)
        written.append(target)
        if progress is not None:
            progress(len(written))
    return written
