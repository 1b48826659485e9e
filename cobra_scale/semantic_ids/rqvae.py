"""RQ-VAE: an MLP autoencoder whose latent is quantised by L residual codebooks of K codes.

Pure torch (no ray / deepspeed). The maths, per item embedding ``x`` (D,):

    x   = (x_raw - mean) / scale            standardised: unit-norm sentence vectors have tiny
                                            per-dimension values, and an unscaled reconstruction
                                            loss lets the latent collapse onto the codebooks
    z   = encoder(x)                        (d,)
    r_0 = z;  c_l = argmin_k ||r_l - C_l[k]||;  r_{l+1} = r_l - C_l[c_l]
    z_q = sum_l C_l[c_l]                     straight-through: z + (z_q - z).detach()
    x^  = decoder(z_q)
    loss = ||x - x^||^2 + sum_l ( ||sg(r_l) - C_l[c_l]||^2 + beta ||r_l - sg(C_l[c_l])||^2 )

Codebooks are initialised by k-means on the first batch (level by level, on the
residuals), and codes unused for ``dead_code_steps`` steps are re-seeded with residuals
drawn from the current batch, so no level collapses onto a few codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers of widths ``dims`` with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Plain Lloyd k-means with k-means++ seeding; ``x`` (n, d) -> centroids (k, d).

    Empty clusters are re-seeded with the points farthest from their centroid.
    """
    n = x.shape[0]
    if n < k:  # too few points: repeat them with a little noise
        reps = -(-k // n)
        x = x.repeat(reps, 1)[:k] + 1e-3 * torch.randn(k, x.shape[1], generator=generator, device=x.device, dtype=x.dtype)
        n = k
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids = [x[first]]
    d2 = torch.cdist(x, centroids[0]).squeeze(1) ** 2
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs, 1, generator=generator)
        centroids.append(x[idx])
        d2 = torch.minimum(d2, (torch.cdist(x, x[idx]).squeeze(1)) ** 2)
    c = torch.cat(centroids)
    for _ in range(iters):
        dist = torch.cdist(x, c)  # (n, k)
        assign = dist.argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c


class ResidualQuantizer(nn.Module):
    """L codebooks of K codes in ``dim`` dimensions, applied to successive residuals."""

    def __init__(self, levels: int, codes: int, dim: int):
        super().__init__()
        self.levels, self.codes, self.dim = levels, codes, dim
        self.codebooks = nn.Parameter(torch.randn(levels, codes, dim) * 0.1)  # (L, K, d)
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, iters: int, generator: torch.Generator) -> None:
        """Set every codebook by k-means on the residuals of ``z`` (n, d)."""
        residual = z
        for level in range(self.levels):
            self.codebooks.data[level] = kmeans(residual, self.codes, iters, generator)
            residual = residual - self.codebooks[level][self._nearest(residual, level)]
        self.initialised.fill_(True)

    def _nearest(self, residual: torch.Tensor, level: int) -> torch.Tensor:
        cb = self.codebooks[level]  # (K, d)
        dist = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ cb.T + cb.pow(2).sum(1)[None]  # (n, K)
        return dist.argmin(1)

    def forward(self, z: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Quantise ``z`` (n, d).

        Returns:
            ``(z_q_straight_through (n, d), codes (n, L) long, codebook+commitment loss, residuals per level)``
        """
        residual = z
        quantized = torch.zeros_like(z)
        codes, residuals = [], []
        loss = z.new_zeros(())
        for level in range(self.levels):
            residuals.append(residual)
            idx = self._nearest(residual.detach(), level)
            e = self.codebooks[level][idx]  # (n, d)
            loss = loss + F.mse_loss(e, residual.detach()) + beta * F.mse_loss(residual, e.detach())
            quantized = quantized + e
            residual = residual - e.detach()
            codes.append(idx)
        z_q = z + (quantized - z).detach()  # straight-through estimator
        return z_q, torch.stack(codes, 1), loss, residuals

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the code vectors of ``codes`` (n, L) -> (n, d)."""
        return sum(self.codebooks[level][codes[:, level]] for level in range(self.levels))


class RQVAE(nn.Module):
    """Encoder MLP -> residual quantiser -> decoder MLP."""

    def __init__(self, input_dim: int, hidden_dims: list[int], latent_dim: int, levels: int, codes: int):
        super().__init__()
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.encoder = mlp([input_dim, *self.hidden_dims, latent_dim])
        self.quantizer = ResidualQuantizer(levels, codes, latent_dim)
        self.decoder = mlp([latent_dim, *reversed(self.hidden_dims), input_dim])
        self.register_buffer("input_mean", torch.zeros(input_dim))  # set by fit_rqvae
        self.register_buffer("input_scale", torch.ones(()))  # one scalar: keeps the geometry

    def standardise(self, x_raw: torch.Tensor) -> torch.Tensor:
        return (x_raw - self.input_mean) / self.input_scale

    def forward(self, x_raw: torch.Tensor, beta: float = 0.25):
        """``x_raw`` (n, D) -> ``(x_hat (n, D) standardised, codes (n, L), recon_loss, quant_loss, residuals)``."""
        x = self.standardise(x_raw)
        z = self.encoder(x)
        z_q, codes, quant_loss, residuals = self.quantizer(z, beta)
        x_hat = self.decoder(z_q)
        return x_hat, codes, F.mse_loss(x_hat, x), quant_loss, residuals

    @torch.no_grad()
    def encode_codes(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Codes (n, L) of item embeddings ``x_raw`` (n, D)."""
        return self.quantizer(self.encoder(self.standardise(x_raw)))[1]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstructed embeddings (n, D), in the input's units, from codes (n, L)."""
        return self.decoder(self.quantizer.lookup(codes)) * self.input_scale + self.input_mean


@dataclass
class FitReport:
    epochs: int
    steps: int
    final_recon_loss: float
    final_quant_loss: float
    reseeded_codes: int


def fit_rqvae(
    vectors: np.ndarray,
    levels: int,
    codes: int,
    latent_dim: int = 32,
    hidden_dims: list[int] = (512, 256, 128),
    epochs: int = 150,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    beta: float = 0.25,
    dead_code_steps: int = 50,
    kmeans_iters: int = 25,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[RQVAE, FitReport]:
    """Train an RQ-VAE on ``vectors`` (N, D) float32; deterministic under ``seed`` on CPU."""
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
    n = x_all.shape[0]
    model = RQVAE(x_all.shape[1], list(hidden_dims), latent_dim, levels, codes).to(device)
    model.input_mean.copy_(x_all.mean(0))
    model.input_scale.fill_(float((x_all - x_all.mean(0)).pow(2).sum(1).mean().sqrt()) / x_all.shape[1] ** 0.5 + 1e-12)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    batch_size = min(batch_size, n)
    usage = torch.zeros(levels, codes, device=device)  # code hits since the last re-seed check
    reseeded, step = 0, 0
    recon = quant = torch.zeros(())
    bar = tqdm(range(epochs), desc="fit rqvae", unit="epoch", disable=not progress)
    for _epoch in bar:
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n - batch_size + 1, batch_size):  # drop the ragged tail: stable batch statistics
            x = x_all[perm[start : start + batch_size]]
            if not bool(model.quantizer.initialised):
                with torch.no_grad():
                    model.quantizer.init_kmeans(model.encoder(model.standardise(x)), kmeans_iters, gen)
            _, batch_codes, recon, quant, residuals = model(x, beta)
            loss = recon + quant
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            for level in range(levels):
                usage[level] += torch.bincount(batch_codes[:, level], minlength=codes)
            if dead_code_steps and step % dead_code_steps == 0:
                reseeded += _reseed_dead_codes(model.quantizer, usage, residuals, gen)
                usage.zero_()
        bar.set_postfix(recon=f"{recon.item():.4f}", quant=f"{quant.item():.4f}")
    model.eval()
    return model, FitReport(epochs, step, float(recon.item()), float(quant.item()), reseeded)


@torch.no_grad()
def _reseed_dead_codes(quantizer: ResidualQuantizer, usage: torch.Tensor, residuals: list[torch.Tensor], gen: torch.Generator) -> int:
    """Replace codes with zero usage by residuals of the current batch; returns how many."""
    total = 0
    for level in range(quantizer.levels):
        dead = torch.nonzero(usage[level] == 0).squeeze(1)
        if len(dead) == 0:
            continue
        r = residuals[level].detach()
        pick = torch.randint(r.shape[0], (len(dead),), generator=gen).to(r.device)
        quantizer.codebooks.data[level, dead] = r[pick] + 1e-3 * torch.randn(len(dead), r.shape[1], generator=gen).to(r.device)
        total += len(dead)
    return total


def encode_in_batches(model: RQVAE, vectors: np.ndarray, batch_size: int = 8192, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(codes (N, L) int64, reconstructions (N, D) float32)`` for ``vectors`` (N, D)."""
    codes, recons = [], []
    for start in range(0, len(vectors), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(vectors[start : start + batch_size], dtype=np.float32)).to(device)
        c = model.encode_codes(x)
        codes.append(c.cpu().numpy())
        recons.append(model.decode_codes(c).cpu().numpy())
    return np.concatenate(codes).astype(np.int64), np.concatenate(recons).astype(np.float32)
