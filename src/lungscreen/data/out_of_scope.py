"""Images a chest X-ray model must refuse: the out-of-scope set of the OOD gate's tests and benchmark.

Each kind is something a screening tool meets in practice and must not diagnose: noise (a broken file
decoded, a detector fault), a blank film, a photograph (a phone picture of a screen, a wrong upload), a CT
slice, a lateral chest film (frontal-view models only), and a chest phantom whose lungs were erased (a body
with nothing to screen). The synthetic kinds are drawn from a seed; the CT slice and the lateral film come
from the real public data when its folder is given (``../shared/data``), else they are left out.

Example:
    >>> paths = write_out_of_scope(Path("oos"), shared=Path("../shared/data"))       # doctest: +SKIP
    >>> sorted(kind_of(p) for p in paths)                                              # doctest: +SKIP
    ['blank', 'ct-slice', 'gaussian-noise', 'lateral', 'no-lungs-phantom', 'photograph', 'uniform-noise']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SIZE = 384
#: scikit-image's bundled photographs (no download): the photograph kind cycles through them.
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")


def synthetic_kinds(seed: int = 0, size: int = SIZE) -> dict[str, np.ndarray]:
    """The kinds drawn here from ``seed``: name -> uint8 image (gray, or RGB for the photograph)."""
    from skimage import data as photographs
    from skimage.transform import resize

    from lungscreen.data.phantoms import render_phantom

    rng = np.random.default_rng(seed)
    phantom = render_phantom("normal", size=size, seed=seed, index=0)
    erased = phantom.image.copy()
    body = np.median(erased[~phantom.mask & (erased > 40)])  # the soft tissue around the lungs
    erased[phantom.mask] = np.uint8(body)
    photo = getattr(photographs, PHOTOGRAPHS[seed % len(PHOTOGRAPHS)])()
    photo = (resize(photo, (size, size, 3), anti_aliasing=True) * 255).astype(np.uint8)
    return {
        "uniform-noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "gaussian-noise": np.clip(rng.normal(rng.uniform(60, 190), rng.uniform(20, 60), (size, size)), 0,
                                  255).astype(np.uint8),
        "blank": np.full((size, size), int(rng.integers(20, 235)), np.uint8),
        "photograph": photo,
        "no-lungs-phantom": erased,
    }


def real_kinds(shared: Path, count: int = 1) -> dict[str, list[Path]]:
    """The kinds taken from the public data: the first ``count`` UCSD COVID-CT slices and lateral films of
    Cohen's collection (name -> files); a kind whose folder is absent is left out."""
    found: dict[str, list[Path]] = {}
    slices = sorted((shared / "ucsd-covid-ct").rglob("*.png"))[:count]
    if slices:
        found["ct-slice"] = slices
    cohen = shared / "cohen-covid-chestxray"
    if (cohen / "metadata.csv").exists():
        meta = pd.read_csv(cohen / "metadata.csv")
        names = meta.loc[meta["view"].astype(str).str.upper().eq("L"), "filename"].astype(str)
        laterals = [cohen / "images" / name for name in names if (cohen / "images" / name).exists()][:count]
        if laterals:
            found["lateral"] = laterals
    return found


def write_out_of_scope(folder: Path, *, shared: Path | None = None, seed: int = 0, per_kind: int = 1) -> list[Path]:
    """Write ``per_kind`` images of every kind into ``folder`` as ``<kind>-<n>.png`` (real files copied as they
    are); returns the files."""
    import shutil

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number in range(per_kind):
        for name, pixels in synthetic_kinds(seed + number).items():
            path = folder / f"{name}-{number}.png"
            Image.fromarray(pixels).save(path)
            written.append(path)
    for name, sources in (real_kinds(shared, per_kind) if shared is not None else {}).items():
        for number, source in enumerate(sources):
            path = folder / f"{name}-{number}{source.suffix.lower()}"
            shutil.copyfile(source, path)
            written.append(path)
    return written


def kind_of(path: Path) -> str:
    """The kind a file written by :func:`write_out_of_scope` holds."""
    return path.stem.rsplit("-", 1)[0]


__all__ = ["kind_of", "real_kinds", "synthetic_kinds", "write_out_of_scope"]
