"""``fedmm simulate --site-data``: the user's own imagefolders as the simulated sites.

Each folder is an imagefolder as ``docs/real-data.md`` describes (images and
``metadata.jsonl``). Several folders: one simulated site each, which reads its folder as a
deployed site reads its own (node config ``imagefolder``, de-identified under the site's
policy with its own secret and cache, ``client.site_data``). One folder and ``--sites N``:
the folder's records are split into N imagefolders under ``<out>/site-data/site-<i>/``
(Flower Datasets' IID or Dirichlet partitioning over the records' ``label``,
``common.data.partitioning``; images hard-linked where the file system allows, else
copied), the same split for the same folder, N, scheme and seed, so ``--resume`` finds it
again. The folders the run uses are recorded in ``<out>/site-data.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmm.common.data.imagefolder import METADATA_FILE
from fedmm.common.data.partitioning import partition_indices
from fedmm.common.federation_config import ConfigError

SPLIT_DIR = "site-data"
SITES_FILE = "site-data.json"


def check_imagefolder(folder: Path) -> Path:
    """``folder`` resolved, or a :class:`ConfigError` naming it and the fix."""
    folder = folder.expanduser().resolve()
    if not (folder / METADATA_FILE).is_file():
        raise ConfigError(
            f"--site-data {folder}: no {METADATA_FILE} there; give an imagefolder (images and "
            f"{METADATA_FILE} with file_name and text per line, docs/real-data.md)"
        )
    return folder


def _metadata(folder: Path) -> list[dict]:
    """The folder's metadata lines that are JSON objects with a file name (the loader skips
    and counts the others, and so does the split)."""
    lines = []
    for raw in (folder / METADATA_FILE).read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and isinstance(line.get("file_name"), str):
            lines.append(line)
    return lines


def _labels(lines: Sequence[dict], *, scheme: str, folder: Path) -> np.ndarray:
    if scheme == "iid":
        return np.zeros(len(lines), dtype=np.int64)
    missing = sum("label" not in line for line in lines)
    if missing:
        raise ConfigError(
            f"--site-data {folder}: {missing} of {len(lines)} records have no label, and "
            "--partition dirichlet splits by label: label them, or use --partition iid"
        )
    names = sorted({json.dumps(line["label"]) for line in lines})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[json.dumps(line["label"])] for line in lines], dtype=np.int64)


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def split_folder(
    folder: Path, out: Path, *, num_sites: int, scheme: str, alpha: float, seed: int
) -> list[Path]:
    """``folder``'s records as ``num_sites`` imagefolders under ``out/site-data/``."""
    lines = _metadata(folder)
    if len(lines) < num_sites:
        raise ConfigError(
            f"--site-data {folder}: {len(lines)} records cannot make {num_sites} sites: "
            "lower --sites"
        )
    labels = _labels(lines, scheme=scheme, folder=folder)
    sites = []
    for site in range(num_sites):
        try:
            indices = partition_indices(
                labels,
                num_partitions=num_sites,
                partition_id=site,
                scheme=scheme,  # type: ignore[arg-type]
                alpha=alpha,
                seed=seed,
            )
        except ValueError as error:
            raise ConfigError(f"--site-data {folder} --sites {num_sites}: {error}") from None
        target = out / SPLIT_DIR / f"site-{site}"
        target.mkdir(parents=True, exist_ok=True)
        kept = []
        for i in sorted(int(i) for i in indices):
            name = lines[i]["file_name"]
            source = (folder / name).resolve()
            if folder not in source.parents or not source.is_file():
                continue  # outside the folder or missing: the loader would skip it too
            _place(source, target / name)
            kept.append(json.dumps(lines[i], ensure_ascii=False))
        (target / METADATA_FILE).write_text("\n".join(kept) + "\n", encoding="utf-8")
        sites.append(target)
    return sites


def simulated_site_folders(
    folders: Sequence[Path],
    out: Path,
    *,
    num_sites: int | None,
    scheme: str,
    alpha: float,
    seed: int,
) -> list[Path]:
    """The imagefolder of each simulated site: ``folders`` themselves (one site each), or
    one folder split into ``num_sites``; written to ``out/site-data.json``."""
    checked = [check_imagefolder(Path(folder)) for folder in folders]
    if len(checked) > 1:
        if num_sites not in (None, len(checked)):
            raise ConfigError(
                f"--sites {num_sites} with {len(checked)} --site-data folders: each folder "
                "is one site; drop --sites, or give one folder to split"
            )
        sites = checked
    else:
        count = 10 if num_sites is None else num_sites
        sites = (
            checked
            if count == 1
            else split_folder(
                checked[0], out.resolve(), num_sites=count, scheme=scheme, alpha=alpha, seed=seed
            )
        )
    (out / SITES_FILE).write_text(json.dumps({"folders": [str(s) for s in sites]}, indent=2))
    return sites


def recorded_site_folders(out: Path) -> list[Path] | None:
    """The site folders an earlier run in ``out`` used (None: it used the benchmark)."""
    path = out / SITES_FILE
    if not path.exists():
        return None
    return [Path(folder) for folder in json.loads(path.read_text())["folders"]]
