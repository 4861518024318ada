"""What encrypting a site's de-identification cache costs: the same de-identified
OpenClipart imagefolder stored and loaded in the clear (the cache's former format, a plain
folder) and encrypted (AES-256-GCM, ``client.deid.cache``), side by side; prints JSON.

    python -m fedmm.simulations.benchmarks.encrypted_cache_cost [--per-category N]
        [--repeats R] [--image-size 64x64]

Steps, on one imagefolder built from Debian's ``openclipart-png`` (``--per-category``
drawings of each category, full resolution) and de-identified once in memory under the
default policy:

- ``store``: writing the de-identified files as a plain folder (``write_bytes`` per file)
  against the encrypted entry (encrypt, write, rename per file, then the encrypted index);
- ``load``: reading the folder with ``load_imagefolder`` against decrypting the entry in
  memory with ``load_imagefolder_files``, both at ``--image-size`` RGB (what a site does
  at every data load of a fresh runner: decoding and letterboxing included);
- ``decrypt_only``: AES-GCM decryption of every file, without image decoding, in MB/s.

Each figure is the median of ``--repeats`` runs on a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(per_category: int, repeats: int, image_size: tuple[int, int]) -> dict[str, Any]:
    from fedmm.client.deid.cache import DeidCache, EncryptedEntry, entry_file_aad
    from fedmm.client.deid.imagefolder import deidentify_imagefolder
    from fedmm.client.deid.policy import DeidPolicy
    from fedmm.client.encrypted_cache import decrypt_bytes
    from fedmm.common.data.imagefolder import load_imagefolder, load_imagefolder_files
    from fedmm.simulations.benchmarks.openclipart_imagefolder import build_openclipart_benchmark

    work = Path(tempfile.mkdtemp(prefix="fedmm-cache-cost-"))
    try:
        build_openclipart_benchmark(work / "oc", per_category=per_category)
        secret = secrets.token_bytes(32)
        files: dict[str, bytes] = {}
        started = time.perf_counter()
        deidentify_imagefolder(
            work / "oc" / "train", Path("-"), DeidPolicy(), secret, sink=files.__setitem__
        )
        deid_s = time.perf_counter() - started
        total_bytes = sum(len(v) for v in files.values())

        plain = work / "plain"

        def store_plain() -> None:
            shutil.rmtree(plain, ignore_errors=True)
            for name, content in files.items():
                target = plain / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)

        cache = DeidCache(work / "cache", secret)
        slot, key = "0" * 16, "1" * 40

        def store_encrypted() -> None:
            cache.discard(slot, key)
            cache.store(slot, key, lambda w: [w.add(n, c) for n, c in files.items()])

        geometry = {"image_size": image_size, "channels": 3}
        store_plain_s = _median_s(store_plain, repeats)
        store_encrypted_s = _median_s(store_encrypted, repeats)
        entry_path = cache.entry_path(slot, key)
        load_plain_s = _median_s(lambda: load_imagefolder(plain, **geometry), repeats)
        load_encrypted_s = _median_s(
            lambda: load_imagefolder_files(EncryptedEntry(entry_path, cache.key), **geometry),
            repeats,
        )
        entry = EncryptedEntry(entry_path, cache.key)
        blobs = {
            file_id: (entry_path / f"{file_id}.bin").read_bytes()
            for file_id in entry.index.values()
        }

        def decrypt_all() -> None:
            for file_id, blob in blobs.items():
                decrypt_bytes(blob, cache.key, entry_file_aad(entry_path.name, file_id))

        decrypt_s = _median_s(decrypt_all, repeats)
        data, _ = load_imagefolder(plain, **geometry)
        on_disk = sum(p.stat().st_size for p in entry_path.iterdir())
        return {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}",
            "records": len(data),
            "files": len(files),
            "megabytes": round(total_bytes / 1e6, 2),
            "encrypted_megabytes_on_disk": round(on_disk / 1e6, 2),
            "image_size": f"{image_size[0]}x{image_size[1]}",
            "repeats": repeats,
            "deidentify_once_s": round(deid_s, 2),
            "store_s": {"plain": round(store_plain_s, 3), "encrypted": round(store_encrypted_s, 3)},
            "load_s": {"plain": round(load_plain_s, 3), "encrypted": round(load_encrypted_s, 3)},
            "load_encrypted_over_plain": round(load_encrypted_s / load_plain_s, 3),
            "store_encrypted_over_plain": round(store_encrypted_s / store_plain_s, 3),
            "decrypt_only_ms": round(decrypt_s * 1000, 2),
            "decrypt_megabytes_per_s": round(total_bytes / 1e6 / decrypt_s, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", default="64x64")
    args = parser.parse_args(argv)
    height, _, width = args.image_size.partition("x")
    print(json.dumps(run(args.per_category, args.repeats, (int(height), int(width))), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
