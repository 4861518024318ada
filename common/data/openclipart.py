"""OpenClipart as real image-text records: Debian's ``openclipart-png`` and ``openclipart-svg``.

The Open Clip Art Library 0.18 (public domain): 8,121 PNG files under
``/usr/share/openclipart/png/<category>/...`` (RGB, RGBA, palette and gray images, from a few
pixels to over 10,000 on a side), and the same drawings as SVG under ``.../svg/`` whose RDF
metadata holds a title (``dc:title``), sometimes a description (``dc:description``) and
keywords (``dc:subject/rdf:Bag/rdf:li``). A record is one PNG that is a file of its own
(1,221 PNGs are symbolic links to a drawing filed under another category; the drawing
counts once, under its own path), its caption made from its SVG's metadata, and the
top-level category folder as its label.

A caption is the title, then the description, then the keywords, joined as
``"title. description. keyword, keyword"``: underscores become spaces, whitespace is
collapsed, a description equal to the title and placeholders (``HASH(0x...)``) are
dropped, and so are keywords that are empty, ``hash``, hexadecimal ids, the creator's name
or repeats. Titles are short and noisy ("gramastar", "card", "Chinese flag (correct)"), as
real alt-text is.

Records are split by a SHA-256 of their relative path, so a record's split never depends on
which other records are present (a subset splits as the whole does): ``bank`` records give
their captions to the public caption bank and are never site records; ``test`` records are
held out; the rest are ``train`` records.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OPENCLIPART_ROOT = Path("/usr/share/openclipart")
DEBIAN_PACKAGES = ("openclipart-png", "openclipart-svg")
_NS = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
}
_PLACEHOLDER = re.compile(r"^(?:hash(?:\(0x[0-9a-f]+\))?|0x[0-9a-f]+)$", re.IGNORECASE)

Split = Literal["bank", "test", "train"]


class OpenClipartNotFoundError(FileNotFoundError):
    """The OpenClipart files are not installed where they were looked for."""


@dataclass(frozen=True)
class ClipartRecord:
    """One drawing: its PNG (relative to the ``png`` folder), caption and category."""

    png: str  # e.g. "animals/birds/cigno_architetto_frances_01.png"
    caption: str
    category: str  # top-level folder: "animals"

    @property
    def split_key(self) -> int:
        """A number in [0, 100) from the SHA-256 of the path: where the record is split."""
        return int.from_bytes(hashlib.sha256(self.png.encode("utf-8")).digest()[:8], "big") % 100


@dataclass(frozen=True)
class SvgMetadata:
    title: str
    description: str
    keywords: tuple[str, ...]
    creator: str


def check_installed(root: Path = OPENCLIPART_ROOT) -> tuple[Path, Path]:
    """The ``png`` and ``svg`` folders under ``root``, or an error naming the packages."""
    png, svg = root / "png", root / "svg"
    missing = [
        name
        for name, folder in zip(DEBIAN_PACKAGES, (png, svg), strict=True)
        if not folder.is_dir()
    ]
    if missing:
        raise OpenClipartNotFoundError(
            f"OpenClipart not found under {root} (no {' or '.join(missing)} files): install "
            f"the Debian packages with: apt-get install -y {' '.join(DEBIAN_PACKAGES)}"
        )
    return png, svg


def read_svg_metadata(path: Path) -> SvgMetadata:
    """Title, description, keywords and creator of the RDF work in an SVG file ("" and ()
    where absent). The SVGs come from a Debian package; Python's expat refuses external
    entities and bounds entity expansion."""
    work = ElementTree.parse(path).getroot().find(".//rdf:RDF/cc:Work", _NS)
    if work is None:
        return SvgMetadata("", "", (), "")
    keywords = tuple(li.text or "" for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS))
    return SvgMetadata(
        title=work.findtext("dc:title", default="", namespaces=_NS),
        description=work.findtext("dc:description", default="", namespaces=_NS),
        keywords=keywords,
        creator=work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=_NS),
    )


def _clean(text: str) -> str:
    return " ".join(text.replace("_", " ").split())


def clipart_caption(metadata: SvgMetadata) -> str:
    """``"title. description. keyword, keyword"`` (see the module docstring); "" when the
    metadata says nothing."""
    title = _clean(metadata.title)
    description = _clean(metadata.description)
    if _PLACEHOLDER.match(description) or description.lower() == title.lower():
        description = ""
    creator = _clean(metadata.creator).lower()
    seen = {title.lower()}
    keywords = []
    for raw in metadata.keywords:
        keyword = _clean(raw)
        lowered = keyword.lower()
        if not keyword or _PLACEHOLDER.match(keyword) or lowered == creator or lowered in seen:
            continue
        seen.add(lowered)
        keywords.append(keyword)
    parts = [title, description, ", ".join(keywords)]
    return ". ".join(part.rstrip(".") for part in parts if part)


def openclipart_records(
    root: Path = OPENCLIPART_ROOT, *, per_category: int | None = None
) -> Iterator[ClipartRecord]:
    """Every drawing with a caption, in sorted path order; ``per_category`` keeps the first
    ones of each top-level category (a small, still deterministic subset)."""
    png_root, svg_root = check_installed(root)
    taken: dict[str, int] = {}
    for png in sorted(p for p in png_root.rglob("*.png") if not p.is_symlink()):
        relative = png.relative_to(png_root)
        category = relative.parts[0]
        if per_category is not None and taken.get(category, 0) >= per_category:
            continue
        svg = svg_root / relative.with_suffix(".svg")
        if not svg.is_file():
            continue
        caption = clipart_caption(read_svg_metadata(svg))
        if not caption:
            continue
        taken[category] = taken.get(category, 0) + 1
        yield ClipartRecord(png=relative.as_posix(), caption=caption, category=category)


def split_of(record: ClipartRecord, *, bank_percent: int, test_percent: int) -> Split:
    """``bank`` for ``bank_percent`` of the records, ``test`` for the next
    ``test_percent``, ``train`` for the rest (by the path's SHA-256)."""
    if min(bank_percent, test_percent) < 0 or bank_percent + test_percent >= 100:
        raise ValueError("bank_percent and test_percent must be >= 0 with a sum below 100")
    key = record.split_key
    if key < bank_percent:
        return "bank"
    return "test" if key < bank_percent + test_percent else "train"
