"""Ways of computing DP-SGD's clipped gradient sum, side by side on the same batches.

For each model width, one batch of benchmark records (Poisson-sized, the default recipe's
expected batch) and these ways of getting sum_i min(1, C / ||g_i||) g_i:

- ``non_private``: the plain batch gradient (the reference cost, no clipping);
- ``opacus_hooks``: ``GradSampleModule`` in hooks mode, then Opacus' clipping (what sites ran);
- ``opacus_functorch``: the same module with ``force_functorch=True`` (per-layer vmap);
- ``opacus_expanded_weights``: ``GradSampleModuleExpandedWeights`` (torch's expanded weights);
- ``opacus_ghost``: ``GradSampleModuleFastGradientClipping`` (ghost clipping, two backward
  passes); Opacus 1.6's norm sampler for ``nn.Linear`` handles 2-D and 3-D inputs only, so it
  fails on this model (the text layers see ``(B, candidates, tokens, width)``): reported;
- ``torch_func``: ``torch.func.vmap(grad(loss))`` over the examples of the whole model;
- ``one_backward``: ``client.per_example_gradients`` (what sites run now).

Each way's clipped sum is compared with ``one_backward``'s (largest absolute difference over
all entries, relative to the largest entry), so a fast way that is not exact shows. Steps
are timed in alternating repetitions (best of ``--repeats``), optimizer step excluded.
Prints JSON. Usage:
    python -m fedmm.simulations.benchmarks.per_example_options [--widths 32 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmm.client.per_example_gradients import PerExampleGradients, clip_factors
from fedmm.client.training import MatchingDataset
from fedmm.common.data.benchmark import benchmark_train_records
from fedmm.common.loss import matching_loss
from fedmm.common.model import CrossAttentionMatcher
from fedmm.common.model_config import IMAGE_ENCODERS, ModelConfig
from fedmm.common.tokenizer import HashingTokenizer

Batch = tuple[torch.Tensor, torch.Tensor]
ClippedSum = Callable[[Batch], dict[str, torch.Tensor]]
CLIP = 1.0


def _named_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in module.named_parameters()}


def _opacus_clip(module: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    """``DPOptimizer.clip_and_accumulate``'s arithmetic on ``p.grad_sample``."""
    params = dict(module.named_parameters())
    norms = torch.stack(
        [p.grad_sample.reshape(batch, -1).norm(2, dim=-1) for p in params.values()], dim=1
    ).norm(2, dim=1)
    factors = clip_factors(norms, CLIP)
    sums = {name: torch.einsum("i,i...", factors, p.grad_sample) for name, p in params.items()}
    for p in params.values():
        p.grad_sample = None
    return sums


def _non_private(model: nn.Module) -> ClippedSum:
    def run(batch: Batch) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        matching_loss(model(*batch)).sum().backward()
        return _named_grads(model)

    return run


def _opacus_module(model: nn.Module, **options) -> ClippedSum:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", **options)

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        wrapped.zero_grad(set_to_none=True)
        matching_loss(wrapped(*batch)).sum().backward()
        return _opacus_clip(model, len(batch[0]))

    return run


def _opacus_expanded_weights(model: nn.Module) -> ClippedSum:
    from opacus.grad_sample import GradSampleModuleExpandedWeights

    wrapped = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="sum")

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        matching_loss(wrapped(*batch)).sum().backward()
        return _opacus_clip(model, len(batch[0]))

    return run


def _opacus_ghost(model: nn.Module) -> ClippedSum:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", max_grad_norm=CLIP
    )

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        wrapped.zero_grad(set_to_none=True)
        losses = matching_loss(wrapped(*batch))
        wrapped.enable_hooks()
        losses.sum().backward(retain_graph=True)
        factors = wrapped.get_clipping_coef()
        wrapped.disable_hooks()
        wrapped.zero_grad(set_to_none=True)
        (losses * factors).sum().backward()
        return _named_grads(model)

    return run


def _torch_func(model: nn.Module) -> ClippedSum:
    from torch.func import functional_call, grad, vmap

    def loss(params: dict[str, torch.Tensor], image: torch.Tensor, tokens: torch.Tensor):
        return matching_loss(functional_call(model, params, (image[None], tokens[None]))).sum()

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        params = {name: p.detach() for name, p in model.named_parameters()}
        grads = per_example(params, *batch)
        count = len(batch[0])
        norms = torch.stack([g.reshape(count, -1).norm(2, dim=-1) for g in grads.values()], 1)
        factors = clip_factors(norms.norm(2, dim=1), CLIP)
        return {name: torch.einsum("i,i...", factors, g) for name, g in grads.items()}

    return run


def _one_backward(model: nn.Module) -> ClippedSum:
    tape = PerExampleGradients(model)

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        tape.backward(matching_loss(model(*batch)))
        return tape.weighted_sums(clip_factors(tape.squared_norms().sqrt(), CLIP))

    return run


WAYS: dict[str, Callable[[nn.Module], ClippedSum]] = {
    "non_private": _non_private,
    "opacus_hooks": _opacus_module,
    "opacus_functorch": lambda model: _opacus_module(model, force_functorch=True),
    "opacus_expanded_weights": _opacus_expanded_weights,
    "opacus_ghost": _opacus_ghost,
    "torch_func": _torch_func,
    "one_backward": _one_backward,
}


def _batches(count: int, size: int, num_distractors: int) -> list[Batch]:
    data = benchmark_train_records().subset(np.arange(count * size))
    dataset = MatchingDataset(
        data, tokenizer=HashingTokenizer(), num_distractors=num_distractors, seed=0
    )
    batches = []
    for start in range(0, count * size, size):
        items = [dataset[i] for i in range(start, start + size)]
        batches.append((torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])))
    return batches


def _relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    scale = max(float(w.abs().max()) for w in want.values())
    return max(float((got[k] - want[k]).abs().max()) for k in want) / scale


def _compare_width(config: ModelConfig, batches: list[Batch], repeats: int) -> dict:
    torch.manual_seed(0)
    base = CrossAttentionMatcher(config)
    runners: dict[str, ClippedSum] = {}
    results: dict[str, dict] = {}
    for name, make in WAYS.items():
        try:
            runner = make(copy.deepcopy(base))
            runner(batches[0])
            runners[name] = runner
        except Exception as error:  # a way that fails on this model is a result too
            results[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    reference = runners["one_backward"](batches[0])
    for name, runner in runners.items():
        results[name] = {"seconds_per_step": [], "relative_difference_to_one_backward": None}
        if name != "non_private":
            difference = _relative_difference(runner(batches[0]), reference)
            results[name]["relative_difference_to_one_backward"] = float(f"{difference:.2e}")
    for _ in range(repeats):
        for name, runner in runners.items():
            started = time.perf_counter()
            for batch in batches:
                runner(batch)
            elapsed = (time.perf_counter() - started) / len(batches)
            results[name]["seconds_per_step"].append(elapsed)
    plain = min(results["non_private"]["seconds_per_step"])
    for name in runners:
        best = min(results[name].pop("seconds_per_step"))
        results[name]["ms_per_step"] = round(best * 1e3, 1)
        results[name]["non_private_over_this"] = round(plain / best, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-encoder", choices=IMAGE_ENCODERS, default="patches")
    parser.add_argument("--num-distractors", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="CPU Autocast only supports")
    torch.set_num_threads(1)
    batches = _batches(args.batches, args.batch_size, args.num_distractors)
    load_before = round(os.getloadavg()[0], 2)
    widths = {
        str(width): _compare_width(
            ModelConfig(width=width, image_encoder=args.image_encoder), batches, args.repeats
        )
        for width in args.widths
    }
    print(
        json.dumps(
            {
                "batch_size": args.batch_size,
                "image_encoder": args.image_encoder,
                "torch_threads": 1,
                "repeats": args.repeats,
                "widths": widths,
                "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
