"""Federated evaluation's counts: what a site sums into SecAgg+, and the rates they give.

A site scores every held-out image against every held-out caption with the global model
(similarity = the model's matching score) and counts, among its own held-out records:

- image->text and text->image recall@k hits for k = 1, 5, 10: the query's own record is
  the one relevant item (Karpathy and Fei-Fei's retrieval protocol, as CLIP reports it);
- the shuffled control: image->text recall@10 hits when each image's relevant caption is
  another record's, by a random permutation of the held-out records (a model that matches
  images to captions scores chance here);
- the chance level: the expected recall@10 hits of random scores, min(10, n) for n records
  (each query's relevant item lands in the top 10 with probability min(10, n) / n);
- with a caption bank in the run, caption-ranking hits: the record's own caption scores
  above all of its public distractors (the training loss's task, ``common.loss``).

Ties count against the query: the relevant item is ranked below every other item with an
equal score, so a model that gives every pair the same score gets no hit beyond
min(k, n) = n (a site with at most k records). Only integer counts leave a site, and only
inside a secure sum (``server.federated_evaluation``); the coordinator divides the summed
hits by the summed record count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

#: The recall cut-offs evaluated.
RECALL_KS = (1, 5, 10)
#: The cut-off of the chance level and of the shuffled control.
CONTROL_K = 10


@dataclass(frozen=True)
class EvaluationCounts:
    """A site's (or the federation's summed) integer counts; the order of the fields is the
    order of the summed vector."""

    records: int = 0
    i2t_hits_1: int = 0
    i2t_hits_5: int = 0
    i2t_hits_10: int = 0
    t2i_hits_1: int = 0
    t2i_hits_5: int = 0
    t2i_hits_10: int = 0
    i2t_shuffled_hits_10: int = 0
    chance_hits_10: int = 0
    bank_hits: int = 0
    bank_records: int = 0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"count {item.name} must be an integer >= 0, got {value!r}")
        hits = (getattr(self, name) for name in self.names() if "hits" in name)
        if any(hit > self.records for hit in hits) or self.bank_records > self.records:
            raise ValueError("a hit count exceeds the records counted")
        if self.bank_hits > self.bank_records:
            raise ValueError("caption-bank hits exceed the caption-bank records")

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(item.name for item in fields(EvaluationCounts))

    @classmethod
    def length(cls) -> int:
        """Entries of the summed vector."""
        return len(fields(cls))

    def to_vector(self) -> np.ndarray:
        """The counts as an unsigned vector (what a site masks, ``integer_update``)."""
        return np.array([int(getattr(self, name)) for name in self.names()], dtype=np.uint64)

    @classmethod
    def from_vector(cls, vector: Sequence[float] | np.ndarray) -> EvaluationCounts:
        """Counts from a summed vector (the coordinator's decoded sum); a negative or
        fractional entry means the sum is not a sum of counts."""
        values = np.asarray(vector, dtype=np.float64).reshape(-1)
        if values.shape != (cls.length(),):
            raise ValueError(f"a counts vector has {cls.length()} entries, got {values.size}")
        if not np.array_equal(values, np.round(values)):
            raise ValueError("a counts vector holds integers only")
        return cls(**{name: int(v) for name, v in zip(cls.names(), values, strict=True)})

    def __add__(self, other: EvaluationCounts) -> EvaluationCounts:
        return EvaluationCounts(
            **{name: getattr(self, name) + getattr(other, name) for name in self.names()}
        )

    def rates(self) -> dict[str, float | int]:
        """What ``metrics.jsonl`` carries under ``federated_eval``: the record count and the
        rates (hits / records); empty rates when no record was counted."""
        out: dict[str, float | int] = {"records": int(self.records)}
        if self.records == 0:
            return out
        n = float(self.records)
        for k in RECALL_KS:
            out[f"r_at_{k}_i2t"] = getattr(self, f"i2t_hits_{k}") / n
        for k in RECALL_KS:
            out[f"r_at_{k}_t2i"] = getattr(self, f"t2i_hits_{k}") / n
        out[f"chance_r_at_{CONTROL_K}"] = self.chance_hits_10 / n
        out[f"r_at_{CONTROL_K}_i2t_shuffled"] = self.i2t_shuffled_hits_10 / n
        if self.bank_records:
            out["caption_bank_accuracy"] = self.bank_hits / self.bank_records
            out["caption_bank_records"] = int(self.bank_records)
        return out


def chance_hits(num_records: int, k: int) -> int:
    """Expected recall@k hits of random scores over ``num_records`` queries, one relevant
    item each: n x min(k, n) / n = min(k, n), an integer."""
    return min(k, num_records)


def recall_hits(
    scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[int, int]:
    """Rows of ``scores`` (queries x items) whose one relevant item (column
    ``relevant[row]``) ranks within the top k, ties counted against it: the number of other
    items scoring at least as high is below k."""
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.arange(scores.shape[0])
    own = scores[rows, relevant]
    at_least = (scores >= own[:, None]).sum(axis=1) - 1  # the relevant item itself
    return {k: int(np.count_nonzero(at_least < k)) for k in ks}


def retrieval_counts(
    scores: np.ndarray,
    *,
    permutation: np.ndarray,
    bank: tuple[int, int] = (0, 0),
) -> EvaluationCounts:
    """The counts of one site from its held-out ``scores`` (images x captions, record i's
    image is row i and its caption column i), the shuffled control's ``permutation`` (image
    i's relevant caption is ``permutation[i]``) and the caption-bank (hits, records)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if scores.shape != (n, n):
        raise ValueError(f"scores must be square (images x captions), got {scores.shape}")
    if n == 0:
        return EvaluationCounts()
    own = np.arange(n)
    i2t = recall_hits(scores, own)
    t2i = recall_hits(scores.T, own)
    shuffled = recall_hits(scores, np.asarray(permutation), ks=(CONTROL_K,))
    values: Mapping[str, int] = {
        **{f"i2t_hits_{k}": v for k, v in i2t.items()},
        **{f"t2i_hits_{k}": v for k, v in t2i.items()},
    }
    return EvaluationCounts(
        records=n,
        i2t_shuffled_hits_10=shuffled[CONTROL_K],
        chance_hits_10=chance_hits(n, CONTROL_K),
        bank_hits=int(bank[0]),
        bank_records=int(bank[1]),
        **values,
    )
