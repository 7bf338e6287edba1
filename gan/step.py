"""One training step of the tutorial: both networks updated from the same forward pass."""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from gan.losses import discriminator_loss, generator_loss

STAT_NAMES = ("loss_d", "loss_g", "d_real_prob", "d_fake_prob")  # train_step's numbers, in the order they are summed


def train_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    real_images: torch.Tensor,  # (N, 1, 28, 28) in [-1, 1], on the networks' device
    noise: torch.Tensor,  # (M, noise_dim)
    amp_dtype: torch.dtype | None = None,  # autocast dtype (torch.bfloat16); None = float32 throughout
    # (N,) int64 classes of real_images, on their device; None = unconditional networks
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Update G and D once, as the tutorial's `train_step` with its two GradientTapes does.

    Works on plain or DDP-wrapped networks. Returns 0-d tensors (`loss_d`, `loss_g`,
    `d_real_prob`, `d_fake_prob`) so that the caller decides when to wait on the device.
    With `labels` (class-conditional networks), D scores each real image with its label and each
    fake image with the label G made it for.
    """
    # The classes to generate: drawn uniformly, independently of the real batch, as the projection
    # paper's and BigGAN's training code draw them. G is then trained on every class equally
    # whatever a shard's batches happen to hold, and the noise count M need not equal N. (The real
    # batch's labels would also be unbiased on a balanced set, but tie G's classes to D's batch.)
    real_kwargs: dict[str, torch.Tensor] = {}  # empty: unconditional networks are called exactly as before
    fake_kwargs: dict[str, torch.Tensor] = {}
    if labels is not None:
        fake_labels = torch.randint(_num_classes(generator), (noise.shape[0],), device=noise.device)  # (M,)
        real_kwargs, fake_kwargs = {"labels": labels}, {"labels": fake_labels}

    # Forward: G makes a batch, D scores it and the real one, in two passes as the tutorial does.
    # Under CUDA graph capture autocast must not cache its casts: the cache would outlive the capture.
    device_type = real_images.device.type
    capturing = device_type == "cuda" and torch.cuda.is_current_stream_capturing()
    autocast = contextlib.nullcontext()
    if amp_dtype:
        autocast = torch.autocast(device_type, dtype=amp_dtype, cache_enabled=not capturing)
    with autocast:
        fake_images = generator(noise, **fake_kwargs)
        real_logits = discriminator(real_images, **real_kwargs).float()
        fake_logits = discriminator(fake_images, **fake_kwargs).float()
    loss_d, loss_g, (d_real_grad, d_fake_grad), g_over_d = _losses_and_logit_gradients(real_logits, fake_logits)

    optimizer_g.zero_grad(set_to_none=True)
    optimizer_d.zero_grad(set_to_none=True)
    # D's gradient, and on the way the gradient of D's loss with respect to the fake images
    # (retain_graph: autograd would otherwise free the saved tensors G's backward needs).
    torch.autograd.backward(
        [real_logits, fake_logits],
        [d_real_grad, d_fake_grad],
        inputs=[*discriminator.parameters(), fake_images],
        retain_graph=True,
    )
    # Both losses reach the fake images through the same D and the same per-image logit (with the
    # same label, when conditional: the projection term is part of that logit), so
    # d loss_g / d image = (d loss_g / d logit) / (d loss_d / d logit) × d loss_d / d image, image by
    # image. That spares a second backward pass through D; G's own backward follows as usual.
    fake_grad = fake_images.grad * g_over_d.view(-1, *[1] * (fake_images.dim() - 1)).to(fake_images.grad.dtype)
    torch.autograd.backward(fake_images, fake_grad, inputs=list(generator.parameters()))
    # Both networks were differentiated against the same D, as with the tutorial's two tapes.
    optimizer_g.step()
    optimizer_d.step()

    with torch.no_grad():
        return {
            "loss_d": loss_d,
            "loss_g": loss_g,
            "d_real_prob": torch.sigmoid(real_logits).mean(),
            "d_fake_prob": torch.sigmoid(fake_logits).mean(),
        }


def _num_classes(generator: nn.Module) -> int:
    """G's number of classes, through a DDP (`.module`) or `torch.compile` (`._orig_mod`) wrapper."""
    while not hasattr(generator, "num_classes"):
        generator = getattr(generator, "module", None) or generator._orig_mod
    return generator.num_classes


MIN_FAKE_LOGIT = -40.0  # D's loss gradient of a fake logit is floored at its value there, sigmoid(-40) / N


def _losses_and_logit_gradients(
    real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss_d, loss_g, d loss_d / d (real, fake) logits, and per fake image (d loss_g / d logit) / (d loss_d / d logit).

    Differentiated by autograd on the logits alone (N numbers each), so `gan.losses` stays the
    one definition of the losses. D's gradient at a fake logit (sigmoid(logit) / N for the
    tutorial's loss) underflows where D is certain an image is fake; it is floored at its value
    for a logit of −40, so that the ratio stays finite and G keeps its full gradient there, while
    D's own gradient changes by at most 4e-18 per image.
    """
    real = real_logits.detach().requires_grad_()
    fake = fake_logits.detach().requires_grad_()
    with torch.enable_grad():
        loss_d = discriminator_loss(real, fake)
        loss_g = generator_loss(fake)
        d_real_grad, d_fake_grad = torch.autograd.grad(loss_d, (real, fake))
        (g_fake_grad,) = torch.autograd.grad(loss_g, fake)
    d_fake_grad = d_fake_grad.clamp(min=1 / (1 + math.exp(-MIN_FAKE_LOGIT)) / fake.numel())
    return loss_d.detach(), loss_g.detach(), (d_real_grad, d_fake_grad), g_fake_grad / d_fake_grad


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (CUDA from Ampere on; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name: `fp32` → None, `bf16` → bfloat16, `auto` → whichever
    measured faster.

    `auto` is bf16 on a CPU that does bf16 natively (1.77x of fp32 on this project's build
    machine) and fp32 on CUDA: these networks are so small that a GPU step waits on kernel
    launches, not arithmetic, and autocast's casts add launches (on an H200, bf16 was 10-12 %
    slower than fp32; both figures in docs/performance.md).
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and bf16_is_native(device) else None
    return {"fp32": None, "bf16": torch.bfloat16}[precision]


def make_optimizer(
    model: nn.Module, lr: float = 1e-4, beta1: float = 0.9, capturable: bool = False
) -> torch.optim.Adam:
    """Adam as Keras configures it (epsilon 1e-7), fused where the device supports it.

    `capturable` (CUDA only): its step count and bias corrections stay on the device, so a CUDA
    graph can replay `step()`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999), eps=1e-7, fused=fused, capturable=capturable)


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Set `capturable` on every parameter group: `load_state_dict` restores the saved flag, which the
    device it was saved on chose (a CPU checkpoint says False; a graphed GPU one says True, which a CPU refuses)."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable


class GeneratorEMA:
    """An exponential moving average of G's weights (BatchNorm statistics follow the live G).

    Averaged weights give steadier samples than the last step's; the raw G keeps training. The
    decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that the first epochs are
    not dominated by the random initial weights.

    The update count and the weight live on the device, so that `update` never waits on it and a
    CUDA graph can replay it. The weight is computed in float64 and cast to float32 once, exactly
    as the Python float it replaces was: the averages are bitwise those of a per-step Python weight.
    """

    def __init__(self, generator: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        device = next(self.module.parameters()).device
        self._updates = torch.zeros((), dtype=torch.int64, device=device)  # updates so far (n)
        self._decay = torch.tensor(decay, dtype=torch.float64, device=device)

    @property
    def updates(self) -> int:
        """Updates so far (reading it waits on the device: for checkpoints, not for every step)."""
        return int(self._updates.item())

    @updates.setter
    def updates(self, value: int) -> None:
        self._updates.fill_(value)  # in place: a captured graph keeps reading this tensor

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        n = self._updates.double()
        weight = (1.0 - torch.minimum(self._decay, (n + 1) / (n + 10))).float()  # 1 - decay, as one float32
        self._updates.add_(1)
        # lerp_ with a 0-d tensor weight: _foreach_lerp_ would read a tensor weight with .item(), a host sync.
        for averaged, live in zip(self.module.parameters(), generator.parameters()):
            averaged.lerp_(live.detach(), weight)
        torch._foreach_copy_(list(self.module.buffers()), list(generator.buffers()))
