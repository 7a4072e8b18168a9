"""Small synthetic manifests and recipes for the training tests (tiny images, tiny models, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from lungscreen.data.manifest import new_row, save_manifest

LABELS = ("normal", "bacterial", "COVID-19")


def make_manifest(root: Path, *, per_class: int = 20, size: int = 40, seed: int = 0, modality: str = "CXR") -> Path:
    """PNG images whose class shows as a bright square in a class-specific place; split 60/20/20 by patient."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    splits = ["train", "train", "train", "val", "test"]
    for i in range(per_class * len(LABELS)):
        label = LABELS[i % len(LABELS)]
        pixels = rng.normal(0.35, 0.08, (size, size))
        corner = {"normal": None, "bacterial": (4, 4), "COVID-19": (size // 2, size // 2)}[label]
        if corner is not None:
            y, x = corner
            pixels[y:y + size // 3, x:x + size // 3] += 0.45
        path = root / f"{label}-{i:03d}.png"
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
        rows.append(new_row(path, label, f"synth-p{i // 2}", "synth", modality=modality, split=splits[(i // 2) % 5],
                            view="PA" if modality == "CXR" else "Axial"))
    parquet, _ = save_manifest(pd.DataFrame(rows), root / "manifest")
    return parquet


def tiny_recipe(manifest: Path, **changes: object) -> dict:
    """A two-stage recipe (head, then all with discriminative rates) that trains in seconds."""
    recipe = {
        "name": "tiny",
        "seed": 3,
        "threads": 1,
        "data": {"manifest": str(manifest), "task": "covidx", "batch_size": 8, "eval_batch_size": 32,
                 "augment": "light", "balance": {"method": "covid_percent", "covid_percent": 0.25}},
        "model": {"name": "covidnet_tiny"},
        "defaults": {"optimizer": {"name": "adam", "lr": 3e-3}},
        "stages": [
            {"name": "head", "epochs": 1, "image_size": 32, "train": "head"},
            {"name": "all", "epochs": 2, "image_size": 40, "train": "all", "optimizer": {"lr": [3e-4, 3e-3]},
             "schedule": {"name": "one_cycle"}},
        ],
    }
    for key, value in changes.items():
        recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def make_phantom_manifest(root: Path, *, per_label: int = 8, size: int = 64, masks_every: int = 2) -> Path:
    """Chest phantoms (normal, bacterial, COVID-19) with lesion boxes and, on every ``masks_every``-th image,
    their lung mask (heart-excluded); split 60/20/20 by patient."""
    from lungscreen.data.manifest import encode_boxes
    from lungscreen.data.phantoms import render_phantom

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    splits = ["train", "train", "train", "val", "test"]
    for i in range(per_label * len(LABELS)):
        label = LABELS[i % len(LABELS)]
        phantom = render_phantom(label, size=size, seed=7, index=i)
        path = root / f"phantom-{i:03d}.png"
        Image.fromarray(phantom.image).save(path)
        fields = {"split": splits[(i // 3) % 5], "view": "PA"}
        if phantom.boxes:
            fields.update(boxes=encode_boxes([(*box, "opacity") for box in phantom.boxes]), box_frame_width=size,
                          box_frame_height=size)
        if i % masks_every == 0:
            mask = root / f"phantom-{i:03d}_mask.png"
            Image.fromarray(phantom.mask.astype(np.uint8) * 255).save(mask)
            fields.update(mask_path=str(mask), mask_convention="heart-excluded")
        rows.append(new_row(path, label, f"phantom-p{i // 3}", "phantoms", **fields))
    parquet, _ = save_manifest(pd.DataFrame(rows), root / "manifest")
    return parquet
