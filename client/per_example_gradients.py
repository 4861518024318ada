"""Per-example gradient norms and weighted sums from one backward pass.

DP-SGD needs, for each step, every example's gradient norm (to clip it) and the sum of the
clipped gradients; it never needs the per-example gradients themselves. Opacus'
``GradSampleModule`` (hooks mode) computes them during a full backward pass, which also
computes the batch gradient of every weight (thrown away) and materialises an embedding's
per-example gradient as a dense ``(batch, vocabulary, width)`` tensor, mostly zeros: that
zero-filling alone was the largest share of DP-SGD's overhead on this model.

Here, as in the "book-keeping" scheme of Bu, Wang, Zha and Karypis ("Differentially
Private Optimization on Large Model at Small Cost", ICML 2023), forward hooks keep each
trainable layer's input and output, and one ``torch.autograd.grad`` call computes the
gradients of the examples' summed loss with respect to the layer outputs only (autograd
then skips every weight gradient). An example's gradient of a layer's weights depends only
on that example's rows of the layer's input and output gradient, so from those two tensors:

- ``nn.Linear``, ``nn.LayerNorm``, ``nn.Conv2d``, ``nn.GroupNorm``: the per-example
  gradients from Opacus' own per-layer grad samplers (``GradSampleModule.GRAD_SAMPLERS``,
  the functions its hooks call), kept for the weighted sum;
- ``nn.Linear`` applied to one row per example (a single token): never materialised either.
  Example i's weight gradient is the outer product ``g_i x_i^T``, so its squared norm is
  ``|g_i|^2 |x_i|^2`` and the weighted sum one matrix product (Goodfellow, "Efficient
  Per-Example Gradient Computations", 2015); a linear map of thousands of features (the
  ``scatter-linear`` encoder) would otherwise keep a batch of weight-sized tensors.
- ``nn.Embedding``: never materialised. Example i's gradient has one row per distinct id it
  uses, the sum of its output gradients at that id; its squared norm is the sum of those rows'
  squared norms (the algorithm of Opacus' embedding norm sampler, with a 1-D key per
  (example, id) pair instead of ``torch.unique(dim=0)``, which is slow on CPU), and the
  weighted sum is one ``index_add`` of the weighted output gradients.

A layer that runs on several consecutive rows per example (an adapted text encoder's blocks
on an item's candidate captions, ``common.pretrained.lora_adapters``) has its rows grouped
by example first (``nn.Linear`` and ``nn.LayerNorm``: the rows are positions).

The result is exact: the same per-example gradients as a single-example backward pass
(``tests/client/test_per_example_gradients.py``), up to floating-point rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from torch import nn

#: Layer types whose per-example gradients Opacus' grad samplers compute from (input, output
#: gradient); ``nn.Embedding`` is handled here without materialising its gradients.
MATERIALISED = (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.GroupNorm)
SUPPORTED = (*MATERIALISED, nn.Embedding)


def _owns_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


@dataclass
class _Call:
    """One forward call of a trainable layer: its input (detached) and its output."""

    layer: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor


class _MaterialisedTerms:
    """Per-example gradients of one layer's parameters, ``{parameter: (B, *shape)}``."""

    def __init__(self, layer: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        sampler = GradSampleModule.GRAD_SAMPLERS[type(layer)]
        self.samples = {p: s for p, s in sampler(layer, [inputs], grad).items() if p.requires_grad}

    def squared_norms(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        total = torch.zeros(batch, dtype=dtype)
        for sample in self.samples.values():
            flat = sample.reshape(batch, -1)
            if dtype == flat.dtype:
                total += torch.linalg.vector_norm(flat, dim=1).square()
            else:
                total += flat.to(dtype).square().sum(1)
        return total

    def weighted_sums(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {
            p: torch.einsum("i,i...->...", weights, sample.to(weights.dtype))
            for p, sample in self.samples.items()
        }


class _RowLinearTerms:
    """A linear layer's per-example gradients when each example is one input row, kept as
    (inputs, output gradients): outer products, never formed."""

    def __init__(self, layer: nn.Linear, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        self.layer = layer
        self.inputs = inputs.reshape(inputs.shape[0], -1)
        self.grad = grad.reshape(grad.shape[0], -1)

    def squared_norms(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        grad_sq = self.grad.to(dtype).square().sum(1)
        total = torch.zeros(batch, dtype=dtype)
        if self.layer.weight.requires_grad:
            total += grad_sq * self.inputs.to(dtype).square().sum(1)
        if self.layer.bias is not None and self.layer.bias.requires_grad:
            total += grad_sq
        return total

    def weighted_sums(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        weighted = self.grad.to(weights.dtype) * weights[:, None]
        sums: dict[nn.Parameter, torch.Tensor] = {}
        if self.layer.weight.requires_grad:
            sums[self.layer.weight] = weighted.T @ self.inputs.to(weights.dtype)
        if self.layer.bias is not None and self.layer.bias.requires_grad:
            sums[self.layer.bias] = weighted.sum(0)
        return sums


def _one_row_per_example(inputs: torch.Tensor) -> bool:
    return inputs.dim() == 2 or (inputs.dim() == 3 and inputs.shape[1] == 1)


def _terms(
    layer: nn.Module, inputs: torch.Tensor, grad: torch.Tensor
) -> _MaterialisedTerms | _RowLinearTerms | _EmbeddingTerms:
    if isinstance(layer, nn.Embedding):
        return _EmbeddingTerms(layer, inputs, grad)
    if isinstance(layer, nn.Linear) and _one_row_per_example(inputs):
        return _RowLinearTerms(layer, inputs, grad)
    return _MaterialisedTerms(layer, inputs, grad)


class _EmbeddingTerms:
    """An embedding's per-example gradients, kept as (ids, output gradients)."""

    def __init__(self, layer: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor) -> None:
        self.layer = layer
        batch = ids.shape[0]
        self.ids = ids.reshape(batch, -1)
        self.grad = grad.reshape(batch, self.ids.shape[1], -1)

    def squared_norms(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        vocabulary = self.layer.num_embeddings
        keys = (torch.arange(batch)[:, None] * vocabulary + self.ids).reshape(-1)
        unique, position = torch.unique(keys, return_inverse=True)
        rows = self.grad.reshape(-1, self.grad.shape[-1]).to(dtype)
        summed = torch.zeros(len(unique), rows.shape[1], dtype=dtype).index_add_(0, position, rows)
        total = torch.zeros(batch, dtype=dtype)
        return total.index_add_(0, unique // vocabulary, summed.square().sum(1))

    def weighted_sums(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        weight = self.layer.weight
        rows = (self.grad.to(weights.dtype) * weights[:, None, None]).reshape(-1, weight.shape[1])
        summed = torch.zeros(weight.shape, dtype=weights.dtype)
        return {weight: summed.index_add_(0, self.ids.reshape(-1), rows)}


class PerExampleGradients:
    """Per-example gradient norms and weighted sums of ``model``'s trainable parameters.

    Use as a context manager (the hooks are removed on exit)::

        with PerExampleGradients(model) as tape:
            tape.backward(per_example_losses(model(batch)))
            norms = tape.squared_norms().sqrt()
            sums = tape.weighted_sums(weights)  # sum_i weights[i] * grad of loss i

    Every layer that owns trainable parameters must be one of ``SUPPORTED`` and run at most
    once per forward pass; the model must not mix examples (no BatchNorm), which Opacus'
    ``ModuleValidator`` checks.
    """

    def __init__(self, model: nn.Module) -> None:
        unsupported = sorted(
            {
                type(m).__name__
                for m in model.modules()
                if _owns_parameters(m) and not isinstance(m, SUPPORTED)
            }
        )
        if unsupported:
            raise ValueError(f"no per-example gradients for layers of type {unsupported}")
        self.model = model
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._calls: list[_Call] = []
        self._terms: list[_MaterialisedTerms | _RowLinearTerms | _EmbeddingTerms] = []
        self._batch = 0
        self._handles = [
            m.register_forward_hook(self._record) for m in model.modules() if _owns_parameters(m)
        ]

    def __enter__(self) -> PerExampleGradients:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls, self._terms = [], []

    def _record(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        if not torch.is_grad_enabled():
            return
        if any(call.layer is layer for call in self._calls):
            raise ValueError(
                f"{type(layer).__name__} ran twice in one forward pass: shared layers are not "
                "supported"
            )
        assert isinstance(output, torch.Tensor)
        self._calls.append(_Call(layer, inputs[0].detach(), output))

    def backward(self, losses: torch.Tensor) -> None:
        """One backward pass from the per-example ``losses`` ``(B,)`` of the forward pass
        just run; replaces the terms of any earlier batch."""
        calls, self._calls = self._calls, []
        if losses.dim() != 1:
            raise ValueError(f"losses must be one per example, shape (B,), got {losses.shape}")
        if not calls:
            raise ValueError("no forward pass with gradients was recorded before backward")
        grads = torch.autograd.grad(losses.sum(), [call.output for call in calls])
        self._batch = losses.shape[0]
        self._terms = []
        for call, grad in zip(calls, grads, strict=True):
            inputs, grad = _rows_by_example(call.layer, call.inputs, grad, self._batch)
            self._terms.append(_terms(call.layer, inputs, grad))

    def squared_norms(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Each example's squared gradient norm over all trainable parameters, ``(B,)``,
        accumulated in ``dtype``."""
        total = torch.zeros(self._batch, dtype=dtype)
        for terms in self._terms:
            total += terms.squared_norms(self._batch, dtype)
        return total

    def weighted_sums(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_i weights[i] * gradient of example i`` for every trainable parameter, by
        name, in the dtype of ``weights``; zeros for a parameter the batch did not reach."""
        if weights.shape != (self._batch,):
            raise ValueError(f"weights must have shape ({self._batch},), got {weights.shape}")
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for terms in self._terms:
            sums.update(terms.weighted_sums(weights))
        return {
            name: sums[p] if p in sums else torch.zeros(p.shape, dtype=weights.dtype)
            for name, p in self.parameters.items()
        }


def _rows_by_example(
    layer: nn.Module, inputs: torch.Tensor, grad: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input and output gradient with the examples on the first dimension. A layer
    that ran on ``m * batch`` rows (an item's candidate captions flattened into the batch
    dimension, as an adapted text encoder's blocks take them) holds ``m`` consecutive rows
    per example: for ``nn.Linear`` and ``nn.LayerNorm`` they become positions of that
    example (their per-example gradient sums over positions)."""
    rows = inputs.shape[0]
    if rows == batch:
        return inputs, grad
    if batch and rows % batch == 0 and isinstance(layer, (nn.Linear, nn.LayerNorm)):
        return (
            inputs.reshape(batch, -1, inputs.shape[-1]),
            grad.reshape(batch, -1, grad.shape[-1]),
        )
    raise ValueError(
        f"{type(layer).__name__} ran on {rows} rows in a batch of {batch} examples: only "
        "Linear and LayerNorm layers may take several consecutive rows per example"
    )


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-example clipping factors: ``min(1, C / (norm + 1e-6))``, as
    ``DPOptimizer.clip_and_accumulate`` computes them."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
