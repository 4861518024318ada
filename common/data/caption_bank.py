"""A public caption bank: captions the coordinator ships with a run, for distractors.

The matching loss (``common.loss``) ranks each record's caption against distractors. Taking
them from other records of the batch would make one record's gradient depend on another's
private caption; taking them from this bank, which is public and the same for every site,
does not. The bank is a UTF-8 text file, one caption per line (run config ``caption-bank``);
blank lines are ignored and surrounding whitespace is stripped. A caption that appears on
several lines is drawn as often as it appears: when the bank's caption frequencies follow the
data's, how common a caption is tells the model nothing, and the loss learns how much more
likely a caption is given the image than without it (noise-contrastive estimation with the
data distribution as noise: Gutmann and Hyvarinen, AISTATS 2010), which is what ranking
captions for an image needs. A bank of distinct lines weights every caption alike.

Its identity is the SHA-256 of the file's bytes, as ``sha256sum`` prints it (run config
``caption-bank-sha256``, recorded in the run's summary). On the wire the file travels
zlib-compressed (RFC 1950) with that digest in every train request; a site decompresses at
most ``MAX_BANK_BYTES`` and refuses a bank whose digest differs.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

MAX_BANK_BYTES = 16 * 1024 * 1024
_COMPRESSION_LEVEL = 9


class CaptionBankError(ValueError):
    """A caption bank that cannot be used; the message names the bank and the fix."""


@dataclass(frozen=True)
class CaptionBank:
    """The captions of a bank file, one per non-blank line in file order (repeats kept),
    and the file's digest."""

    captions: tuple[str, ...]
    sha256: str  # hex digest of the file's bytes
    raw: bytes = field(repr=False, compare=False)  # the file's bytes, as shipped

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str) -> CaptionBank:
        """The bank in ``raw`` (the bytes of a bank file); ``source`` names it in errors."""
        if len(raw) > MAX_BANK_BYTES:
            raise CaptionBankError(
                f"caption bank {source} is {len(raw)} bytes, above {MAX_BANK_BYTES}: it "
                "travels in every train request; ship a smaller bank"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CaptionBankError(
                f"caption bank {source} is not UTF-8 text (byte {err.start}): save it as "
                "UTF-8, one caption per line"
            ) from None
        captions = tuple(line.strip() for line in text.splitlines() if line.strip())
        if not captions:
            raise CaptionBankError(
                f"caption bank {source} holds no caption: write one public caption per line"
            )
        return cls(captions=captions, sha256=hashlib.sha256(raw).hexdigest(), raw=raw)

    @classmethod
    def from_file(cls, path: Path | str) -> CaptionBank:
        """The bank in the file at ``path`` (read again when the file changes)."""
        try:
            stat = Path(path).stat()
        except FileNotFoundError:
            raise CaptionBankError(
                f"caption bank {path} not found: set run config 'caption-bank' to an existing "
                "UTF-8 text file (an absolute path when the app runs under flwr), one caption "
                "a line"
            ) from None
        return _bank_from_file(str(path), stat.st_mtime_ns, stat.st_size)

    def to_wire(self) -> bytes:
        """The file's bytes, zlib-compressed, as train requests carry them."""
        return zlib.compress(self.raw, _COMPRESSION_LEVEL)

    @classmethod
    def from_wire(cls, data: bytes, *, sha256: str) -> CaptionBank:
        """The bank a train request carries, checked against the digest it names."""
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(data, MAX_BANK_BYTES + 1)
        except zlib.error:
            raise CaptionBankError(
                "the caption bank in the train request is not zlib data: the request was "
                "damaged or not made by fedmm; the coordinator must send it again"
            ) from None
        if len(raw) > MAX_BANK_BYTES or inflater.unconsumed_tail:
            raise CaptionBankError(
                f"the caption bank in the train request inflates beyond {MAX_BANK_BYTES} "
                "bytes: refused"
            )
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise CaptionBankError(
                f"the caption bank in the train request has SHA-256 {digest}, but the request "
                f"names {sha256 or 'none'}: it was altered or cut in transit; the coordinator "
                "must send it again"
            )
        return cls.from_bytes(raw, source=f"sha256:{digest[:12]}")


@lru_cache(maxsize=4)
def _bank_from_file(path: str, _mtime_ns: int, _size: int) -> CaptionBank:
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise CaptionBankError(
            f"caption bank {path} is a directory: name the text file itself"
        ) from None
    return CaptionBank.from_bytes(raw, source=path)
