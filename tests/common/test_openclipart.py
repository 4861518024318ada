"""OpenClipart as a real-data benchmark, on the real Debian files (small subsets)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedmm.common.data.caption_bank import CaptionBank
from fedmm.common.data.imagefolder import load_imagefolder
from fedmm.common.data.openclipart import (
    OPENCLIPART_ROOT,
    OpenClipartNotFoundError,
    SvgMetadata,
    clipart_caption,
    openclipart_records,
    read_svg_metadata,
    split_of,
)
from fedmm.simulations.benchmarks.openclipart_imagefolder import build_openclipart_benchmark, main

needs_openclipart = pytest.mark.skipif(
    not (OPENCLIPART_ROOT / "svg").is_dir(),
    reason="needs apt-get install openclipart-png openclipart-svg",
)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_caption_joins_title_description_and_clean_keywords() -> None:
    metadata = SvgMetadata(
        title=" libyan_arab_jamahiriya",
        description="HASH(0x862bbb8)",
        keywords=("hash", "", "0x8b754fc", "flag", "Flag", "africa", "Cezary Biele"),
        creator="Cezary Biele",
    )
    assert clipart_caption(metadata) == "libyan arab jamahiriya. flag, africa"
    described = SvgMetadata("Extremadura", "a simple map of extremadura.", ("map",), "x")
    assert clipart_caption(described) == "Extremadura. a simple map of extremadura. map"
    assert clipart_caption(SvgMetadata("", "", ("",), "")) == ""


@needs_openclipart
def test_real_svg_metadata_is_read() -> None:
    svg = OPENCLIPART_ROOT / "svg/science/medicine/siringa_architetto_franc_01.svg"
    metadata = read_svg_metadata(svg)
    assert metadata.title == "siringa"
    assert metadata.creator == "Architetto Francesco Rollandin"
    # the only keyword is the creator's name: it names the artist, not the drawing
    assert clipart_caption(metadata) == "siringa"


@needs_openclipart
def test_records_are_real_files_once_each_labelled_by_top_category() -> None:
    records = list(openclipart_records(per_category=4))
    categories = sorted({r.category for r in records})
    assert len(categories) == 22 and "animals" in categories
    assert all(sum(r.category == c for r in records) <= 4 for c in categories)
    paths = [r.png for r in records]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    for record in records:
        png = OPENCLIPART_ROOT / "png" / record.png
        assert png.is_file() and not png.is_symlink()
        assert record.png.split("/")[0] == record.category and record.caption


@needs_openclipart
def test_benchmark_folder_is_deterministic_and_bank_records_are_never_site_records(
    tmp_path: Path,
) -> None:
    first = build_openclipart_benchmark(tmp_path / "a", per_category=6)
    second = build_openclipart_benchmark(tmp_path / "b", per_category=6)
    assert first == second
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")

    out = tmp_path / "a"
    records = {r.png: r for r in openclipart_records(per_category=6)}
    site_files = set()
    for split in ("train", "test"):
        for line in (out / split / "metadata.jsonl").read_text().splitlines():
            entry = json.loads(line)
            png = entry["file_name"].removeprefix("images/")
            assert split_of(records[png], bank_percent=15, test_percent=10) == split
            assert entry["label"] == png.split("/")[0]
            assert entry["text"] == records[png].caption
            site_files.add(png)
    bank_records = [
        r for r in records.values() if split_of(r, bank_percent=15, test_percent=10) == "bank"
    ]
    assert bank_records and not {r.png for r in bank_records} & site_files
    bank = CaptionBank.from_file(out / "caption-bank.txt")
    assert set(bank.captions) == {r.caption for r in bank_records}
    assert first["caption_bank"]["sha256"] == bank.sha256
    assert sum(first["records"].values()) == len(records)


@needs_openclipart
def test_the_folder_loads_as_a_colour_imagefolder(tmp_path: Path) -> None:
    build_openclipart_benchmark(tmp_path / "oc", per_category=3, bank_percent=0, test_percent=0)
    data, report = load_imagefolder(
        tmp_path / "oc" / "train", image_size=(64, 64), channels=3, caption_words=12
    )
    assert len(data) + report.total_skipped == 66 and len(data) >= 60
    assert data.images.shape[1:] == (64, 64, 3)
    assert report.conversions.get("transparency_composited", 0) > 20
    assert len(report.label_names or []) == 22
    # drawings in colour: some images have channels that differ
    assert (np.ptp(data.images.astype(int), axis=-1) > 30).any(axis=(1, 2)).sum() > 10


def test_missing_packages_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(OpenClipartNotFoundError, match="apt-get install -y openclipart-png"):
        list(openclipart_records(tmp_path))
    assert main([str(tmp_path / "out"), "--source", str(tmp_path)]) == 2
    assert "openclipart-png openclipart-svg" in capsys.readouterr().err


@needs_openclipart
def test_an_output_folder_in_use_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("someone's file")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_openclipart_benchmark(tmp_path, per_category=1)
    assert (tmp_path / "keep.txt").read_text() == "someone's file"
