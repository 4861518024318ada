"""What a caption bank is to the model and on the wire, before a run ships it.

For the bank file and the run's text settings (``--set model-vocab-buckets=N``,
``--set model-caption-words=W``, ``--set num-distractors=K``), prints JSON:

- ``sha256`` (what the run config pins and the summary records), captions, bytes;
- ``distinct_to_the_model``: captions the tokenizer tells apart (distractors are drawn
  among these; at least ``num-distractors`` + 1 are needed);
- ``captions_truncated``: captions longer than the model reads;
- ``collisions``: distinct words that share a hash bucket, with a few groups as examples
  (the bank is public, so its words may be printed);
- ``wire``: the bank zlib-compressed, and a train request's serialised ConfigRecord with
  and without it (every site receives one request per round).

Usage::

    python -m fedmm.simulations.benchmarks.caption_bank_report BANK.txt [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.common.serde import config_record_to_proto

from fedmm.common.cli_arguments import key_value_pairs
from fedmm.common.data.caption_bank import CaptionBank
from fedmm.common.distractors import DistractorSampler
from fedmm.common.federation_config import FederationConfig
from fedmm.common.tokenizer import HashingTokenizer, bucket_collisions
from fedmm.common.train_request import TrainRequest, model_config_of


def _request_bytes(config: FederationConfig) -> int:
    request = TrainRequest.for_round(config, 1)
    return config_record_to_proto(ConfigRecord(request.to_config())).ByteSize()


def caption_bank_report(bank_file: Path, overrides: dict[str, str]) -> dict[str, object]:
    """The report of ``bank_file`` under the run config ``overrides``."""
    config = FederationConfig.from_run_config({**overrides, "caption-bank": str(bank_file)})
    bank = CaptionBank.from_file(bank_file)
    tokenizer = HashingTokenizer.for_model(model_config_of(config))
    sampler = DistractorSampler(
        config.distractor_settings(), tokenizer=tokenizer, num_distractors=config.num_distractors
    )
    without = FederationConfig.from_run_config({**overrides, "caption-bank": ""})
    return {
        "file": str(bank_file),
        "sha256": bank.sha256,
        "captions": len(bank.captions),
        "bytes": len(bank.raw),
        "distinct_to_the_model": len(sampler.bank_tokens),
        "tokenizer": {"buckets": tokenizer.num_buckets, "words": tokenizer.max_len},
        "captions_truncated": sum(tokenizer.is_truncated(c) for c in bank.captions),
        "collisions": bucket_collisions(bank.captions, tokenizer).to_dict(),
        "wire": {
            "bank_zlib_bytes": len(bank.to_wire()),
            "train_request_bytes": _request_bytes(config),
            "train_request_bytes_without_bank": _request_bytes(without),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bank", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    report = caption_bank_report(args.bank, key_value_pairs(args.set, option="--set"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
