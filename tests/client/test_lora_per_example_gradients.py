# ruff: noqa: E402 (torchvision is imported through its shim before timm)
"""LoRA adapters (``peft``) on the last block of a timm ViT: the one-backward per-example
gradients (``client.per_example_gradients``) of the adapters alone equal single-example
backward passes, so DP-SGD's clipping covers them like the rest of the trained part.

A LoRA layer adds ``B A x`` to a frozen linear layer, with ``A`` and ``B`` two plain
``nn.Linear`` (Hu et al., ICLR 2022, as ``peft`` builds them): both are layers whose
per-example gradients Opacus' grad samplers compute, and the frozen base layer has none."""

from __future__ import annotations

import pytest
import torch

from fedmm.common.pretrained.torchvision_shim import import_torchvision

import_torchvision()
timm = pytest.importorskip("timm")
peft = pytest.importorskip("peft")

from fedmm.client.per_example_gradients import PerExampleGradients, clip_factors


def _lora_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    last = len(model.blocks) - 1
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=[f"blocks.{last}.attn.qkv", f"blocks.{last}.mlp.fc1"],
    )
    model = peft.get_peft_model(model, config).double()
    model.eval()  # no dropout; LoRA's B starts at zero: give it values, as after training
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model


def _losses(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    tokens = model.forward_features(images)  # (B, P, D)
    return ((tokens - targets) ** 2).mean(dim=(1, 2))


def test_only_the_adapters_train_and_their_per_example_gradients_are_exact() -> None:
    model = _lora_vit()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    targets = torch.randn(4, 5, 64, generator=generator, dtype=torch.float64)
    with PerExampleGradients(model) as tape:
        tape.backward(_losses(model, images, targets))
        norms = tape.squared_norms(torch.float64).sqrt()
        eye = torch.eye(4, dtype=torch.float64)
        per_example = [tape.weighted_sums(eye[i]) for i in range(4)]
        clipped = tape.weighted_sums(clip_factors(norms, 0.01))
    expected_sum: dict[str, torch.Tensor] = {}
    for i in range(4):
        model.zero_grad(set_to_none=True)
        _losses(model, images[i : i + 1], targets[i : i + 1]).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        norm = torch.cat([g.flatten() for g in grads.values()]).norm()
        torch.testing.assert_close(norms[i], norm)
        factor = min(1.0, 0.01 / (float(norm) + 1e-6))
        for name, grad in grads.items():
            torch.testing.assert_close(per_example[i][name], grad, rtol=1e-7, atol=1e-12)
            expected_sum[name] = expected_sum.get(name, 0) + factor * grad
    assert float(norms.min()) > 0.01  # every example is clipped
    for name, value in expected_sum.items():
        torch.testing.assert_close(clipped[name], value, rtol=1e-7, atol=1e-12)
