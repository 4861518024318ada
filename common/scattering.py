"""Fixed scattering features of canvases, memoised by content.

A 2-D scattering transform (Mallat, "Group Invariant Scattering", CPAM 2012; Bruna, Mallat,
"Invariant Scattering Convolution Networks", TPAMI 2013) with J = 2 scales and L = 8
orientations: 1 + J*L + L^2 * J(J-1)/2 = 81 channels on a grid 2^J = 4 times coarser than
the canvas. Its filters are fixed Morlet wavelets, so the features depend on no data and cost
no privacy; Tramer and Boneh ("Differentially Private Learning Needs Better Features (or
Much More Data)", ICLR 2021) showed that DP-SGD on top of them beats end-to-end CNNs on
Fashion-MNIST at epsilon 3. The transform comes from kymatio (Andreux et al., JMLR 2020),
the reference implementation from the authors' group, rather than a hand-written filter bank.

The transform costs about 1.6 ms a 28x56 canvas on one core, more than the DP-SGD step on
the scatter model (about 1.25 ms a record: ``simulations.benchmarks.dp_throughput
--image-encoder scatter``), and its result never changes: ``scattering_features`` keeps the
features of every canvas it has computed, keyed by a 128-bit BLAKE2b hash of the pixels, so
a site's records are transformed once per process, not once per step. (A deployed site
starts a process per message, so it transforms each round's sample again.)
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from common.model_config import SCATTER_SCALES as SCALES
from common.model_config import SCATTER_STRIDE as STRIDE

ORIENTATIONS = 8  # L
CHANNELS = 1 + SCALES * ORIENTATIONS + ORIENTATIONS**2 * SCALES * (SCALES - 1) // 2
MEMO_LIMIT = 100_000  # canvases (28x56: 31.8 kB of features each, 3.2 GB at the limit)

_memo: dict[bytes, torch.Tensor] = {}


@lru_cache(maxsize=4)
def _transform(height: int, width: int):  # -> kymatio ScatteringTorch2D
    # Imported from the 2-D frontend: ``kymatio.torch`` also imports the 3-D transform, whose
    # filter bank needs ``scipy.special.sph_harm`` (removed in SciPy 1.15).
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCALES, shape=(height, width), L=ORIENTATIONS)


def _key(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()


def scattering_features(images: torch.Tensor) -> torch.Tensor:
    """``images`` ``(N, H, W)`` in [0, 1] to features ``(N, 81, H/4, W/4)``; H and W must be
    multiples of 4."""
    if images.dim() != 3 or images.shape[1] % STRIDE or images.shape[2] % STRIDE:
        raise ValueError(
            f"scattering needs canvases (N, H, W) with H and W multiples of {STRIDE}, "
            f"got shape {tuple(images.shape)}"
        )
    n, height, width = images.shape
    out = torch.empty(n, CHANNELS, height // STRIDE, width // STRIDE)
    if n == 0:
        return out
    images = images.detach().float().contiguous()
    keys = [_key(image) for image in images]
    missing = []
    for i, key in enumerate(keys):
        kept = _memo.get(key)
        if kept is None:
            missing.append(i)
        else:
            out[i] = kept
    if missing:
        with torch.no_grad():
            out[missing] = _transform(height, width)(images[missing])
        if len(_memo) + len(missing) > MEMO_LIMIT:
            _memo.clear()
        for i in missing[:MEMO_LIMIT]:
            _memo[keys[i]] = out[i].clone()
    return out
