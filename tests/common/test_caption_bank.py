"""The public caption bank: read from the coordinator's file, shipped in every train request,
checked by the site against the digest the request names."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_to_proto

from fedmm.common.data import caption_bank
from fedmm.common.data.caption_bank import CaptionBank, CaptionBankError
from fedmm.common.federation_config import ConfigError, FederationConfig
from fedmm.common.train_request import TrainRequest

BANK_TEXT = "a red apple\n\n  stick man  \nflag of brazil\na red apple\nroad sign: stop\n"


@pytest.fixture()
def bank_file(tmp_path: Path) -> Path:
    path = tmp_path / "bank.txt"
    path.write_text(BANK_TEXT, encoding="utf-8")
    return path


def test_bank_keeps_stripped_lines_with_their_repeats_and_the_file_digest(
    bank_file: Path,
) -> None:
    bank = CaptionBank.from_file(bank_file)
    assert bank.captions == (
        "a red apple",
        "stick man",
        "flag of brazil",
        "a red apple",  # drawn twice as often as the others
        "road sign: stop",
    )
    assert bank.sha256 == hashlib.sha256(bank_file.read_bytes()).hexdigest()


def test_bank_survives_the_wire_and_a_changed_byte_is_refused(bank_file: Path) -> None:
    bank = CaptionBank.from_file(bank_file)
    assert CaptionBank.from_wire(bank.to_wire(), sha256=bank.sha256) == bank
    tampered = zlib.compress(bank.raw.replace(b"brazil", b"brasil"))
    with pytest.raises(CaptionBankError, match=r"has SHA-256 [0-9a-f]{64}, but the request names"):
        CaptionBank.from_wire(tampered, sha256=bank.sha256)
    with pytest.raises(CaptionBankError, match="not zlib data"):
        CaptionBank.from_wire(b"not zlib", sha256=bank.sha256)


def test_a_bank_that_inflates_past_the_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(caption_bank, "MAX_BANK_BYTES", 1000)
    bomb = zlib.compress(b"a caption\n" * 10_000)
    assert len(bomb) < 1000
    with pytest.raises(CaptionBankError, match="inflates beyond 1000 bytes"):
        CaptionBank.from_wire(bomb, sha256="0" * 64)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\n  \n", "holds no caption"),
        (b"caf\xe9\n", r"not UTF-8 text \(byte 3\)"),
    ],
)
def test_unusable_bank_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bank.txt"
    path.write_bytes(content)
    with pytest.raises(CaptionBankError, match=message):
        CaptionBank.from_file(path)
    with pytest.raises(CaptionBankError, match=r"not found.*'caption-bank'"):
        CaptionBank.from_file(tmp_path / "missing.txt")


def test_run_config_records_the_digest_and_refuses_a_changed_file(bank_file: Path) -> None:
    digest = hashlib.sha256(bank_file.read_bytes()).hexdigest()
    config = FederationConfig.from_run_config({"caption-bank": str(bank_file)})
    assert config.caption_bank_sha256 == digest
    assert config.to_run_config()["caption-bank-sha256"] == digest  # into summary.json
    pinned = FederationConfig.from_run_config(
        {"caption-bank": str(bank_file), "caption-bank-sha256": digest}
    )
    assert pinned == config
    bank_file.write_text(BANK_TEXT + "a new caption\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'caption-bank-sha256' pins .*the file changed"):
        TrainRequest.for_round(pinned, 1)
    with pytest.raises(ConfigError, match="caption-bank-sha256"):
        FederationConfig.from_run_config({"caption-bank-sha256": digest})
    with pytest.raises(ConfigError, match="64 lower-case hex digits"):
        FederationConfig.from_run_config(
            {"caption-bank": str(bank_file), "caption-bank-sha256": "abc"}
        )


def test_train_request_carries_the_bank_through_a_config_record(bank_file: Path) -> None:
    config = FederationConfig.from_run_config(
        {"caption-bank": str(bank_file), "distractor-word-lists": "colours,positions"}
    )
    request = TrainRequest.for_round(config, 3)
    received = TrainRequest.from_config(dict(ConfigRecord(request.to_config())))
    assert received == request
    settings = received.distractor_settings()
    assert settings.bank == CaptionBank.from_file(bank_file)
    assert settings.word_lists == ("colours", "positions")

    altered = TrainRequest.from_config(
        {**request.to_config(), "caption_bank_zlib": zlib.compress(b"road sign: go\n")}
    )
    with pytest.raises(CaptionBankError, match="altered or cut in transit"):
        altered.distractor_settings()


def test_a_run_without_a_bank_sends_none() -> None:
    request = TrainRequest.for_round(FederationConfig(), 1)
    assert request.caption_bank_zlib == b"" and request.caption_bank_sha256 == ""
    assert request.caption_bank() is None
    record = config_record_to_proto(ConfigRecord(request.to_config()))
    assert record.ByteSize() < 2000  # the request without a bank stays small
