"""Train the shipped digits model and its judge: ``python -m diffinv.train_digits --out src/diffinv/models``.

A class-conditional eps-prediction ``UNet2DModel`` (channels 16/32, no attention) on scikit-learn's
bundled handwritten digits (1797 8x8 images, upsampled to 16x16, pixels in [-1, 1]) under Stable
Diffusion 1.5's scaled-linear schedule, with 15 % label dropout so that classifier-free guidance works.
Runs on one CPU thread in about ten minutes and is reproducible from ``--seed`` (same torch build).
The judge is a multinomial logistic regression on the 16x16 pixels, trained here in torch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedules import NoiseSchedule

__all__ = ["NULL_CLASS", "build_unet", "digits_dataset", "main", "sample_digits", "train_judge", "train_unet"]

NULL_CLASS = 10  # the class label of the unconditional branch (labels 0..9 are the digits)
SIZE = 16


def digits_dataset() -> tuple[Tensor, Tensor]:
    """scikit-learn's ``load_digits`` as ``(1797, 1, 16, 16)`` float32 images in [-1, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the "digits" extra is missing
        raise ImportError("training the digits model needs scikit-learn: pip install 'diffinv[train]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(data.target, dtype=torch.int64)


def sample_digits(per_class: int = 8) -> Tensor:
    """The first ``per_class`` images of each digit, ``(10, per_class, 1, 16, 16)``: the demo's sources."""
    x, y = digits_dataset()
    return torch.stack([x[y == d][:per_class] for d in range(10)])


def build_unet() -> torch.nn.Module:
    """The architecture of the shipped model (diffusers ``UNet2DModel``, 11 class embeddings incl. null)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=NULL_CLASS + 1,
    )


def train_unet(
    steps: int = 1400, batch: int = 64, lr: float = 2e-3, seed: int = 0, dropout: float = 0.15, log: bool = True
) -> tuple[torch.nn.Module, float]:
    """Train the eps-model; returns it (eval mode) and the mean loss of the last 200 steps."""
    torch.manual_seed(seed)
    x, y = digits_dataset()
    unet = build_unet()
    schedule = NoiseSchedule.scaled_linear()
    abar = schedule.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        x0, label = x[idx], y[idx].clone()
        label[torch.rand(batch, generator=gen) < dropout] = NULL_CLASS
        t = torch.randint(0, abar.numel(), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + (1 - a**2).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=label).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % 100 == 0:
            recent = sum(losses[-100:]) / 100
            print(f"step {step + 1}/{steps} loss {recent:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    unet.eval()
    return unet, sum(losses[-200:]) / min(200, len(losses))


def train_judge(seed: int = 0, epochs: int = 300) -> tuple[Tensor, Tensor, float]:
    """Multinomial logistic regression on 16x16 pixels (full-batch L-BFGS); weight, bias, training accuracy."""
    torch.manual_seed(seed)
    x, y = digits_dataset()
    feats = x.flatten(1).double()
    w = torch.zeros(10, feats.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=epochs, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(feats @ w.T + b, y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    acc = ((feats @ w.T + b).argmax(-1) == y).double().mean().item()
    return w.detach().float(), b.detach().float(), acc


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "models")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: more threads only contend
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"images": sample_digits()}, str(args.out / "digits_samples.safetensors"))
    w, b, acc = train_judge(args.seed)
    save_file({"weight": w, "bias": b}, str(args.out / "digits_judge.safetensors"))
    print(f"judge: training accuracy {acc:.3f}", flush=True)
    unet, loss = train_unet(steps=args.steps, seed=args.seed)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    meta = {"steps": str(args.steps), "seed": str(args.seed), "final_loss": f"{loss:.4f}"}
    save_file(state, str(args.out / "digits_unet.safetensors"), metadata=meta)
    print(f"unet: final loss {loss:.4f}, {sum(v.numel() for v in state.values())} parameters", flush=True)


if __name__ == "__main__":
    main()
