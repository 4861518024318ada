"""Fixed scattering features of images, memoised by content.

A 2-D scattering transform (Mallat, "Group Invariant Scattering", CPAM 2012; Bruna, Mallat,
"Invariant Scattering Convolution Networks", TPAMI 2013) with J = 2 scales and L = 8
orientations: 1 + J*L + L^2 * J(J-1)/2 = 81 channels on a grid 2^J = 4 times coarser than
the image, for each image channel (a colour image gives 3 x 81 = 243 channels, as Tramer and
Boneh's CIFAR-10 features). Its filters are fixed Morlet wavelets, so the features depend on
no data and cost no privacy; Tramer and Boneh ("Differentially Private Learning Needs Better
Features (or Much More Data)", ICLR 2021) showed that DP-SGD on top of them beats end-to-end
CNNs on Fashion-MNIST at epsilon 3. The transform comes from kymatio (Andreux et al., JMLR 2020),
the reference implementation from the authors' group, rather than a hand-written filter bank.

The transform costs about 1.6 ms a 28x56 canvas on one core, more than the DP-SGD step on
the scatter model (about 1.25 ms a record: ``simulations.benchmarks.dp_throughput
--image-encoder scatter``), and its result never changes: ``scattering_features`` keeps the
features of every image it has computed, keyed by a 128-bit BLAKE2b hash of the pixels and
their shape, so a site's records are transformed once per process, not once per step, up to
``MEMO_BYTES`` of features (then the memo starts afresh). A site computes the features of all
its records at once when it loads them and keeps them encrypted beside its de-identified data
(``client.scattering_cache``), so the next process (another simulation actor, the next round
of a deployed site) reads them instead: :func:`remember_scattering_features` puts them back in
the memo, :func:`memoised` says whether a batch is all there already.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import torch

from fedmm.common.model_config import SCATTER_SCALES as SCALES
from fedmm.common.model_config import SCATTER_STRIDE as STRIDE

ORIENTATIONS = 8  # L
CHANNELS = 1 + SCALES * ORIENTATIONS + ORIENTATIONS**2 * SCALES * (SCALES - 1) // 2
#: Features kept in memory: 100,000 canvases of 28x56 (31.8 kB each); 3,200 RGB images of
#: 128x128 (995 kB each).
MEMO_BYTES = 3_200_000_000

_memo: dict[bytes, torch.Tensor] = {}


@lru_cache(maxsize=4)
def _transform(height: int, width: int):  # -> kymatio ScatteringTorch2D
    # Imported from the 2-D frontend: ``kymatio.torch`` also imports the 3-D transform, whose
    # filter bank needs ``scipy.special.sph_harm`` (removed in SciPy 1.15).
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCALES, shape=(height, width), L=ORIENTATIONS)


def _key(image: torch.Tensor) -> bytes:
    digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=16)
    digest.update(repr(tuple(image.shape)).encode())
    return digest.digest()


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if images.dim() not in (3, 4) or images.shape[-2] % STRIDE or images.shape[-1] % STRIDE:
        raise ValueError(
            f"scattering needs images (N, C, H, W) or (N, H, W) with H and W multiples of "
            f"{STRIDE}, got shape {tuple(images.shape)}"
        )
    return (images[:, None] if images.dim() == 3 else images).detach().float().contiguous()


def memoised(images: torch.Tensor) -> bool:
    """Whether the features of every image of ``images`` (as :func:`scattering_features`
    takes them) are in this process's memo."""
    return all(_key(image) in _memo for image in _as_batch(images))


def remember_scattering_features(images: torch.Tensor, features: torch.Tensor) -> None:
    """Put ``features`` (what :func:`scattering_features` returned for ``images``, e.g. read
    back from a site's cache) in the memo, so later batches of these images reuse them."""
    batch = _as_batch(images)
    if len(features) != len(batch) or features.dim() != 4:
        raise ValueError(
            f"features {tuple(features.shape)} do not match images {tuple(batch.shape)}"
        )
    _keep([_key(image) for image in batch], features.float().contiguous())


def _keep(keys: list[bytes], rows: torch.Tensor) -> None:
    """Memoise ``rows[i]`` under ``keys[i]`` (views of ``rows``), within ``MEMO_BYTES``."""
    if not keys:
        return
    limit = max(1, MEMO_BYTES // (rows[0].numel() * rows.element_size()))
    if len(_memo) + len(keys) > limit:
        _memo.clear()
    for key, row in zip(keys[:limit], rows[:limit], strict=False):
        _memo[key] = row


def scattering_features(images: torch.Tensor) -> torch.Tensor:
    """``images`` ``(N, C, H, W)`` in [0, 1] to features ``(N, 81 C, H/4, W/4)``, the 81
    channels of each image channel together; ``(N, H, W)`` is taken as one channel. H and W
    must be multiples of 4."""
    images = _as_batch(images)
    n, channels, height, width = images.shape
    out = torch.empty(n, channels * CHANNELS, height // STRIDE, width // STRIDE)
    if n == 0:
        return out
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
            features = _transform(height, width)(images[missing])  # (M, C, 81, H/4, W/4)
            features = features.flatten(1, 2).contiguous()
        out[missing] = features
        _keep([keys[i] for i in missing], features)
    return out
