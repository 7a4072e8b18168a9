"""`lungscreen data ...`: build, check and inspect manifests over public dataset folders."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich.markup import escape
from rich.table import Table

from lungscreen.cli.data_download import download_command
from lungscreen.cli.data_synth import synth_command
from lungscreen.cli.output import ensure_folder, stdout_console

app = typer.Typer(help="Build one manifest from public chest-image datasets, find duplicates, synthesize phantoms, download sources.",
                  no_args_is_help=True)
app.command("synth")(synth_command)
app.command("download")(download_command)
out = stdout_console()

FOLDERS = typer.Argument(..., help="Data folders; every known layout found inside (up to 3 levels deep) is read.",
                         exists=True, file_okay=False)


@app.command()
def build(
    folders: list[Path] = FOLDERS,
    out_path: Path = typer.Option(..., "--out", "-o", help="Manifest to write: OUT.parquet and OUT.csv (+ OUT.composition.csv, OUT.skips.csv)."),
    ratios: str = typer.Option("0.7,0.15,0.15", help="train,val,test shares (patient clusters are assigned whole)."),
    seed: int = typer.Option(0, help="Seed of the split: the same seed gives the same split."),
    workers: int = typer.Option(2, min=1, help="Processes decoding images."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the folder of --out if it does not exist."),
) -> None:
    """Detect the sources in FOLDERS, merge them, split by patient and print the composition table.

    Every image is decoded once: unreadable files are reported (OUT.skips.csv) and left out. Near-duplicates
    (within and across sources) and images of one patient always land in the same split; a leakage guard
    refuses the manifest otherwise. `lungscreen data sources` lists the layouts it reads.

    **Your own images** follow no public layout: list them in a CSV instead, one row per image, with the
    columns image_path (relative to the CSV's folder, or absolute; PNG, JPEG or DICOM), label (normal,
    bacterial, viral, fungal, pneumonia, COVID-19, other or unknown), patient_id, source (your hospital's
    name) and split (train, val or test for every row, or empty for all: a split is then made). View,
    modality, fine_label, mask_path and mask_convention may be added. `lungscreen data import CSV --out M`
    checks it row by row and writes the manifest as this command does; `lungscreen data validate M.parquet`
    checks it again later.

    ```
    image_path,label,patient_id,source,split
    images/0001.png,normal,P0001,stmarys,train
    images/0002.dcm,COVID-19,P0002,stmarys,test
    ```

    **Examples**

    ```
    lungscreen data build data/ --out data/manifest
    lungscreen data build data/ --out data/manifest --ratios 0.8,0.1,0.1 --seed 1
    ```
    """
    from lungscreen.data.build import build_manifest
    from lungscreen.data.composition import flat_composition
    from lungscreen.data.manifest import check_files, load_manifest, save_manifest
    from lungscreen.io.files import atomic_path

    shares = split_ratios(ratios)
    ensure_folder(out_path, mkdir)
    result = build_manifest(folders, ratios=shares, seed=seed, workers=workers)
    for name, root in result.sources:
        join = result.joins.get((name, root))
        note = f" [dim]({join.describe()})[/]" if join else ""
        out.print(f"[dim]found[/] {name:<22} {escape(str(root))}{note}", soft_wrap=True)
    parquet, csv = save_manifest(result.manifest, out_path)
    stem = parquet.with_suffix("")
    with atomic_path(stem.with_suffix(".composition.csv")) as temporary:
        flat_composition(result.manifest).to_csv(temporary, index=False)
    with atomic_path(stem.with_suffix(".skips.csv")) as temporary:
        pd.DataFrame(result.skips.items, columns=["path", "reason"]).to_csv(temporary, index=False)
    check_files(load_manifest(parquet), parquet)  # the written paths resolve from where the manifest lies
    print_composition(result.manifest)
    out.print(f"{counts(result.manifest)}, {len(result.skips)} skipped")
    for reason, count in sorted(result.skips.by_reason().items(), key=lambda item: -item[1]):
        out.print(f"  [yellow]skipped[/] {count:>5}  {reason}")
    out.print(f"wrote {parquet} and {csv.name}")


@app.command("import")
def import_command(
    csv_path: Path = typer.Argument(..., metavar="CSV", exists=True, dir_okay=False,
                                    help="Your CSV: image_path, label, patient_id, source, split (see `data build "
                                         "--help`); paths relative to the CSV's folder."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Manifest to write: OUT.parquet and OUT.csv."),
    ratios: str = typer.Option("0.7,0.15,0.15", help="train,val,test shares when the CSV gives no split."),
    seed: int = typer.Option(0, help="Seed of the split when the CSV gives none."),
    workers: int = typer.Option(2, min=1, help="Processes decoding images."),
    mkdir: bool = typer.Option(False, "--mkdir", help="Create the folder of --out if it does not exist."),
) -> None:
    """Make a manifest of your own images from a hand-written CSV, checked row by row.

    Every problem is named by its line and column (an unknown label, a missing file, an empty patient, a
    split given for some rows only); every image is decoded once; near-duplicates are grouped, and a patient
    or a near-duplicate in two splits is refused. Without a split column (or with it empty) the split is made
    as `data build` makes it. The manifest then trains, evaluates and audits like any other.

    **Examples**

    ```
    lungscreen data import my_hospital.csv --out my_hospital
    lungscreen evaluate runs/RUN --on my_hospital.parquet --split all --out eval
    ```
    """
    from lungscreen.data.csv_import import import_csv
    from lungscreen.data.manifest import save_manifest

    shares = split_ratios(ratios)
    ensure_folder(out_path, mkdir)
    result = import_csv(csv_path, ratios=shares, seed=seed, workers=workers)
    parquet, csv = save_manifest(result.manifest, out_path)
    print_composition(result.manifest)
    out.print(f"{counts(result.manifest)}; split {f'made (seed {seed})' if result.split_made else 'as given'}")
    out.print(f"wrote {parquet} and {csv.name}")


def split_ratios(text: str) -> tuple[float, float, float]:
    """``--ratios`` as train, val and test shares (a ConfigError naming the option otherwise)."""
    from lungscreen.data.splits import parse_ratios
    from lungscreen.errors import ConfigError, ManifestError

    try:
        return parse_ratios(text)
    except ManifestError as error:
        raise ConfigError(f"--ratios: {error}") from None


def counts(frame: pd.DataFrame) -> str:
    """Images, patients and near-duplicate groups of a manifest, for the line a build or an import ends with."""
    groups = frame["dup_group"].replace("", pd.NA).dropna()
    return (f"{len(frame)} images, {frame['patient_id'].nunique()} patients, {groups.nunique()} near-duplicate "
            f"groups ({len(groups)} images)")


@app.command()
def sources() -> None:
    """List the dataset layouts lungscreen reads (what `data build` detects in a folder)."""
    from lungscreen.data.sources import get_source, list_sources

    table = Table(title="known source layouts")
    table.add_column("name")
    table.add_column("modality")
    table.add_column("layout")
    for name in list_sources():
        adapter = get_source(name)
        table.add_row(name, adapter.modality, escape(adapter.description))
    out.print(table)


@app.command()
def validate(manifest: Path = typer.Argument(..., help="Manifest (.parquet or .csv).")) -> None:
    """Check a manifest's schema, that every image and mask it lists exists, and that no patient or
    near-duplicate sits in two splits.

    **Examples**

    ```
    lungscreen data validate data/manifest.parquet
    lungscreen data validate my_hospital.csv
    ```
    """
    from lungscreen.data.manifest import check_files, load_manifest
    from lungscreen.data.splits import check_leakage

    frame = load_manifest(manifest)
    check_files(frame, manifest)
    check_leakage(frame)
    print_composition(frame)
    if (frame["split"] == "").all():
        warn_no_split(frame, manifest)
    out.print(f"[green]ok[/]: {len(frame)} images, {frame['patient_id'].nunique()} patients, every file present, "
              "no leakage")


def warn_no_split(frame: pd.DataFrame, manifest: Path) -> None:
    """One line: the manifest has no split, and the command that makes one."""
    from lungscreen.data.build import data_folder
    from lungscreen.data.manifest import manifest_paths

    folder = data_folder(frame["image_path"].tolist()) or "DATA_FOLDER"
    target = manifest_paths(manifest)[0].with_suffix("")
    command = f"lungscreen data build {folder} --out {target}-split"
    out.print(f"[yellow]warning[/]: {escape(str(manifest))} has no train/val/test split (no 'split' column, or all "
              f"empty); make one with: {escape(command)}", soft_wrap=True)


@app.command()
def relocate(
    manifest: Path = typer.Argument(..., help="Manifest (.parquet or .csv) whose data folder moved."),
    old: Path = typer.Option(..., "--from", help="The data folder's old place (a prefix of the manifest's paths)."),
    new: Path = typer.Option(..., "--to", help="Its new place."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Accept a --to folder that does not exist yet."),
) -> None:
    """Rewrite the image and mask paths under OLD to lie under NEW, after the data folder moved.

    Absolute paths starting with OLD and relative ones resolving under it are rewritten; the manifest
    (.parquet and .csv) is written back atomically, paths stored relative to its folder where they lie under it.
    """
    from lungscreen.data.manifest import relocate_manifest

    result = relocate_manifest(manifest, old, new, dry_run=dry_run, allow_missing=allow_missing)
    verb = "would change" if dry_run else "changed"
    out.print(f"{verb} {len(result.changed)} path(s) of {escape(str(manifest))}", soft_wrap=True)
    for before, after in result.changed[:3]:
        out.print(f"  {escape(before)} -> {escape(after)}", soft_wrap=True)
    if result.missing:
        first = ", ".join(path for _, path in result.missing[:3])
        are = "would be" if dry_run else "are"
        out.print(f"[yellow]{len(result.missing)} of {result.listed} image/mask files {are} still missing[/], "
                  f"first: {escape(first)}", soft_wrap=True)
    else:
        resolves = "would resolve" if dry_run else "resolves"
        out.print(f"[green]every path {resolves}[/] ({result.listed} image/mask files)")
    if result.written is not None:
        out.print(f"wrote {result.written[0]} and {result.written[1].name}")


@app.command()
def dedup(
    inputs: list[Path] = typer.Argument(..., help="Data folders or a manifest (.parquet/.csv).", exists=True),
    out_path: Path | None = typer.Option(None, "--out", "-o", help="CSV of every near-duplicate pair found."),
    workers: int = typer.Option(2, min=1, help="Processes decoding images."),
) -> None:
    """Find near-duplicate images within and across sources (pHash + thumbnail correlation).

    Candidates are pairs whose 64-bit pHashes differ in <= 10 bits and whose 32x32 thumbnails correlate >= 0.94; a candidate is a duplicate when the thumbnails correlate >= 0.965, the hashes differ in <= 2 bits, or the fine detail (64x64 high-pass) correlates >= 0.7. The thresholds were measured on the public sets: see lungscreen.data.dedup.
    """
    from lungscreen.data.build import collect_rows, detail_reader, inspect_images
    from lungscreen.data.dedup import find_duplicates
    from lungscreen.data.manifest import load_manifest, validate as check
    from lungscreen.data.sources import Skips
    from lungscreen.io.files import atomic_path

    skips = Skips()
    if len(inputs) == 1 and inputs[0].suffix in (".parquet", ".csv"):
        frame = load_manifest(inputs[0])
    else:
        frame = check(collect_rows(inputs, skips)[0])
    frame, hashes, thumbnails = inspect_images(frame, skips, workers=workers)
    pairs = find_duplicates(hashes, thumbnails, detail_reader(frame["image_path"].tolist()))
    table = pd.DataFrame({
        "first": frame["image_path"].to_numpy()[[p.first for p in pairs]] if pairs else [],
        "second": frame["image_path"].to_numpy()[[p.second for p in pairs]] if pairs else [],
        "first_source": frame["source"].to_numpy()[[p.first for p in pairs]] if pairs else [],
        "second_source": frame["source"].to_numpy()[[p.second for p in pairs]] if pairs else [],
        "hash_distance": [p.distance for p in pairs],
        "correlation": [round(p.correlation, 4) for p in pairs],
    })
    print_duplicates(table)
    if out_path is not None:
        with atomic_path(out_path) as temporary:
            table.to_csv(temporary, index=False)
        out.print(f"wrote {len(table)} pairs to {out_path}")


def print_duplicates(pairs: pd.DataFrame) -> None:
    """Pairs and distinct images involved, per pair of sources."""
    table = Table(title="near-duplicates per source pair")
    for column in ("source", "copied in", "pairs", "images (first)", "images (second)"):
        table.add_column(column, justify="left" if column in ("source", "copied in") else "right")
    if pairs.empty:
        out.print("no near-duplicates found")
        return
    ordered = pairs.copy()
    swap = ordered["first_source"] > ordered["second_source"]
    ordered.loc[swap, ["first", "second", "first_source", "second_source"]] = ordered.loc[
        swap, ["second", "first", "second_source", "first_source"]].to_numpy()
    for (first, second), rows in ordered.groupby(["first_source", "second_source"]):
        table.add_row(first, second if second != first else "(within)", str(len(rows)),
                      str(rows["first"].nunique()), str(rows["second"].nunique()))
    out.print(table)


def print_composition(frame: pd.DataFrame) -> None:
    """The composition table (images / patients per source x modality x label x split)."""
    from lungscreen.data.composition import composition

    counts = composition(frame)
    splits = list(dict.fromkeys(counts.columns.get_level_values(0)))
    table = Table(title="composition: images / patients", padding=(0, 1), collapse_padding=True)
    for column in ("source", "modality", "label"):
        table.add_column(column, no_wrap=True)
    for split in splits:
        table.add_column(split, justify="right", no_wrap=True)
    for (source, modality, label), row in counts.iterrows():
        table.add_row(source, modality, label, *(f"{row[(s, 'images')]}/{row[(s, 'patients')]}" for s in splits))
    totals = [_images_and_patients(frame, split) for split in splits]
    table.add_row("[bold]all", "", "", *totals)
    out.print(table)


def _images_and_patients(frame: pd.DataFrame, split: str) -> str:
    rows = frame if split == "total" else frame[frame["split"] == ("" if split == "unsplit" else split)]
    return f"{len(rows)}/{rows['patient_id'].nunique()}"
