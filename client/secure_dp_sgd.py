"""DP-SGD steps whose randomness comes from a CSPRNG, at an explicit sampling rate.

DP-SGD (Abadi et al., CCS 2016): each example's gradient clipped to C with Opacus' clipping
factor min(1, C / (norm + 1e-6)), summed, noised and divided by the expected batch size.
The per-example norms and the clipped sum come from one backward pass
(``client.per_example_gradients``: Opacus' per-layer grad samplers on the layer inputs and
output gradients, embeddings without dense per-example gradients), not from
``GradSampleModule``'s hooks, which cost 1.6x to 3x a non-private step on this model, over
the batch split by caption length (``client.caption_length_batches``: same gradients); the
step itself is Opacus' ``DPOptimizerFastGradientClipping`` (it takes the clipped sum as
``p.grad``). Three parts of Opacus 1.6 are replaced, two because they draw from torch's
Mersenne Twister (its ``secure_mode`` needs torchcsprng, which has no torch 2 builds) and
because its data loader derives the sampling rate from the true record count:

- **Poisson sampling**: Opacus' ``DPDataLoader`` samples each step with q = 1/len(loader), a
  function of the site's true record count, using torch's generator. Here record i joins a
  step when u_i < q, with q given explicitly (a site derives it from its noisy, accounted
  record count) and u_i from the CSPRNG (``common.secure_random.bernoulli_indices``).
- **Noise**: ``DPOptimizer.add_noise`` draws ``torch.normal``; :class:`SecureNoiseDPOptimizer`
  adds N(0, (sigma C)^2) per coordinate from Box-Muller deviates of the CSPRNG
  (``common.secure_random.standard_normals``), then Opacus divides by the expected batch.
- **Per-example gradients**: as above.

Accounting: Opacus' ``RDPAccountant`` (Mironov, Talwar, Zhang 2019, the sampled Gaussian
mechanism), stepped by the optimizer's hook with that same explicit q, exactly as
``PrivacyEngine`` attaches it. An empty Poisson batch still takes a noise-only step, so every
step the accountant counts happened.

Audit only (``simulations.privacy.gradient_canary_audit``, a white-box one-run audit of
this step): :class:`StepAudit` adds extra per-example gradients (gradient canaries) to a
step's batch, clipped by the same ``clip_factors`` and summed with the records' clipped
gradients before the noise, and shows the auditor every step's released (noisy, averaged)
gradient. A site never passes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch.utils.data import Dataset

from fedmm.client.caption_length_batches import Batch, BatchParts, caption_length_parts
from fedmm.client.per_example_gradients import PerExampleGradients, clip_factors
from fedmm.common.loss import matching_loss
from fedmm.common.secure_random import RandomBytes, bernoulli_indices, standard_normals

AccountantHistory = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)


@dataclass(frozen=True)
class StepAudit:
    """Audit only: what a white-box auditor adds to and sees of each DP-SGD step.

    ``extra_gradients(step)`` gives the per-example gradients that join step ``step``'s
    batch, ``{parameter name: (k, *shape)}`` with the same ``k`` for every name given (names
    left out are zero; an empty dict adds nothing); they are clipped like the records'
    gradients (their joint norm over the names given) and added to the clipped sum before
    the noise. ``observe(step, released)`` then sees the step's released gradient,
    ``{parameter name: (clipped sum + noise) / expected batch size}``, before the next step
    overwrites it.
    """

    extra_gradients: Callable[[int], dict[str, torch.Tensor]]
    observe: Callable[[int, dict[str, torch.Tensor]], None]


class SecureNoiseDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' DP optimizer for a clipped sum given as ``p.grad``, with its Gaussian noise
    drawn from ``random_bytes``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        random_bytes: RandomBytes,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,  # type: ignore[arg-type]
            loss_reduction="mean",
        )
        self.random_bytes = random_bytes

    def add_noise(self) -> None:
        """``p.grad`` = clipped sum + N(0, (noise_multiplier * max_grad_norm)^2), one draw of
        the CSPRNG for all parameters of the step."""
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        std = self.noise_multiplier * self.max_grad_norm
        total = sum(p.summed_grad.numel() for p in params)
        noise = torch.from_numpy(standard_normals(total, self.random_bytes) * std)
        offset = 0
        for p in params:
            size = p.summed_grad.numel()
            chunk = noise[offset : offset + size].view_as(p.summed_grad)
            offset += size
            p.grad = (p.summed_grad + chunk.to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)


def poisson_batch(dataset: Dataset, *, sample_rate: float, random_bytes: RandomBytes) -> Batch:
    """One Poisson batch of the dataset's items (tuples of tensors), stacked; every record
    joins with probability ``sample_rate``. An empty batch keeps the item shapes (zero
    rows)."""
    size = len(dataset)  # type: ignore[arg-type]
    indices = bernoulli_indices(size, sample_rate, random_bytes)
    if indices.size == 0:
        return tuple(torch.zeros((0, *t.shape), dtype=t.dtype) for t in dataset[0])
    items = [dataset[int(i)] for i in indices]
    return tuple(torch.stack(column) for column in zip(*items, strict=True))


def train_dp_sgd(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    expected_batch_size: float,
    accountant_history: AccountantHistory,
    random_bytes: RandomBytes,
    batch_parts: BatchParts = caption_length_parts,
    audit: StepAudit | None = None,
) -> tuple[float, AccountantHistory]:
    """``steps`` DP-SGD steps on ``model`` (trained in place), whose forward takes a batch's
    tensors (``model(*part)``) cut into parts by ``batch_parts``; the mean loss over the
    sampled records (for the site's own log: it is not differentially private) and the
    accountant's history after ``accountant_history``. ``audit``: audit runs only
    (:class:`StepAudit`)."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    ModuleValidator.validate(model, strict=True)
    private = SecureNoiseDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        random_bytes=random_bytes,
    )
    accountant = RDPAccountant()
    accountant.history = list(accountant_history)
    private.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total_loss, total_items = 0.0, 0
    model.train()
    with PerExampleGradients(model) as tape:
        for step in range(steps):
            batch = poisson_batch(dataset, sample_rate=sample_rate, random_bytes=random_bytes)
            private.zero_grad(set_to_none=True)
            for p in parameters.values():
                # An empty Poisson batch leaves zeros: a noise-only step, which the
                # accountant counts.
                p.grad = torch.zeros_like(p)
            # Examples are independent: each group's clipped sum adds to the batch's.
            for part in batch_parts(batch):
                losses = matching_loss(model(*part))
                tape.backward(losses)
                factors = clip_factors(tape.squared_norms().sqrt(), max_grad_norm)
                for name, clipped_sum in tape.weighted_sums(factors).items():
                    parameters[name].grad += clipped_sum
                total_loss += float(losses.detach().sum())
                total_items += len(part[0])
            if audit is not None:
                _add_clipped(parameters, audit.extra_gradients(step), max_grad_norm)
            private.step()
            if audit is not None:
                audit.observe(step, {name: p.grad for name, p in parameters.items()})
    history = [(float(s), float(q), int(n)) for s, q, n in accountant.history]
    return total_loss / max(total_items, 1), history


def _add_clipped(
    parameters: dict[str, torch.nn.Parameter],
    per_example: dict[str, torch.Tensor],
    max_grad_norm: float,
) -> None:
    """Add the clipped sum of ``per_example`` gradients (``{name: (k, *shape)}``) to the
    parameters' ``grad``, with the records' clipping (``clip_factors`` of their joint
    norms)."""
    unknown = sorted(set(per_example) - set(parameters))
    if unknown:
        raise ValueError(f"audit gradients for unknown or frozen parameters: {unknown}")
    counts = {g.shape[0] for g in per_example.values()}
    if len(counts) > 1:
        raise ValueError(f"audit gradients disagree on the number of examples: {counts}")
    if not per_example or counts == {0}:
        return
    squared = sum(g.reshape(g.shape[0], -1).double().square().sum(1) for g in per_example.values())
    factors = clip_factors(torch.as_tensor(squared).sqrt(), max_grad_norm)
    for name, gradients in per_example.items():
        weights = factors.to(gradients.dtype).view(-1, *([1] * (gradients.dim() - 1)))
        parameters[name].grad += (weights * gradients).sum(0)
