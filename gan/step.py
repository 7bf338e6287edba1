"""One training step of the tutorial: both networks updated from the same forward pass."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from gan.losses import discriminator_loss, generator_loss


def train_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    real_images: torch.Tensor,  # (N, 1, 28, 28) in [-1, 1], on the networks' device
    noise: torch.Tensor,  # (M, noise_dim)
    amp_dtype: torch.dtype | None = None,  # autocast dtype (torch.bfloat16); None = float32 throughout
) -> dict[str, torch.Tensor]:
    """Update G and D once, as the tutorial's `train_step` with its two GradientTapes does.

    Works on plain or DDP-wrapped networks. Returns 0-d tensors (`loss_d`, `loss_g`,
    `d_real_prob`, `d_fake_prob`) so that the caller decides when to wait on the device.
    """
    # Forward: G makes a batch, D scores it and the real one. Two D passes rather than one over
    # the concatenation, so that G's backward runs through D for the fake half only.
    autocast = torch.autocast(real_images.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with autocast:
        fake_images = generator(noise)
        real_logits = discriminator(real_images).float()
        fake_logits = discriminator(fake_images).float()
    loss_d = discriminator_loss(real_logits, fake_logits)
    loss_g = generator_loss(fake_logits)

    # Accumulate gradients: each loss reaches only its own network's weights, so both updates
    # see the same D, as with the tutorial's two tapes. G's pass keeps the graph for D's.
    optimizer_g.zero_grad(set_to_none=True)
    optimizer_d.zero_grad(set_to_none=True)
    # Update G: minimise −log D(G(z)).
    torch.autograd.backward(loss_g, inputs=list(generator.parameters()), retain_graph=True)
    # Update D: maximise log D(x) + log(1 − D(G(z))).
    torch.autograd.backward(loss_d, inputs=list(discriminator.parameters()))
    optimizer_g.step()
    optimizer_d.step()

    with torch.no_grad():
        return {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "d_real_prob": torch.sigmoid(real_logits).mean(),
            "d_fake_prob": torch.sigmoid(fake_logits).mean(),
        }


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (CUDA from Ampere on; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name: `fp32` → None, `bf16` → bfloat16, `auto` → bf16 where native."""
    if precision == "auto":
        return torch.bfloat16 if bf16_is_native(device) else None
    return {"fp32": None, "bf16": torch.bfloat16}[precision]


def make_optimizer(model: nn.Module, lr: float = 1e-4, beta1: float = 0.9) -> torch.optim.Adam:
    """Adam as Keras configures it (epsilon 1e-7), fused where the device supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999), eps=1e-7, fused=fused)


class GeneratorEMA:
    """An exponential moving average of G's weights (BatchNorm statistics follow the live G).

    Averaged weights give steadier samples than the last step's; the raw G keeps training. The
    decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that the first epochs are
    not dominated by the random initial weights.
    """

    def __init__(self, generator: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for averaged, live in zip(self.module.parameters(), generator.parameters()):
            averaged.lerp_(live.detach(), 1.0 - decay)
        for averaged, live in zip(self.module.buffers(), generator.buffers()):
            averaged.copy_(live)
