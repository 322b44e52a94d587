"""The Vision Transformer shared by ViT, GenViT and HybViT (paper Eq. 17-21).

One network, two heads:
  * ``classify(x0)``   clean images, no time input  -> logits from LN + Linear on the CLS token (Eq. 20).
  * ``denoise(xt, t)`` noisy images and timesteps   -> predicted noise, same shape as the image (Eq. 21).

Time conditioning is the paper's Eq. 21 taken literally, as its code did: t -> sinusoidal embedding -> MLP -> A;
each block has one Linear(SiLU(A)) giving a (scale, shift) *scalar per token* (CLS included) and applies
h <- h * (1 + scale) + shift to the residual stream before the attention and again before the MLP sub-block.
Without t (classification) the blocks are plain pre-LN ViT blocks (Eq. 18-19).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                      # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    """Multi-head self-attention (Eq. 16) through F.scaled_dot_product_attention; qkv without bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                   # each (B, heads, L, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)               # (B, heads, L, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))      # (B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block with the paper's per-token time modulation M(h, A) (Eq. 21)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, tokens: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # One (scale, shift) scalar pair per token, from the time embedding A.
        self.modulation = nn.Linear(time_dim, 2 * tokens)

    def forward(self, h: torch.Tensor, A: torch.Tensor | None = None, n_plain: int = 0) -> torch.Tensor:
        # h: (B, N+1, D); A: (B - n_plain, time_dim) or None (no time input: a plain ViT block, Eq. 18-19).
        # The first n_plain rows of h get no modulation (scale = shift = 0 is exactly "no time input").
        if A is None:
            h = h + self.attn(self.norm1(h))                      # Eq. 18
            return h + self.mlp(self.norm2(h))                    # Eq. 19
        scale, shift = self.modulation(F.silu(A)).unsqueeze(-1).chunk(2, dim=1)  # each (B - n_plain, N+1, 1)
        if n_plain:
            scale, shift = F.pad(scale, (0, 0, 0, 0, n_plain, 0)), F.pad(shift, (0, 0, 0, 0, n_plain, 0))
        h = h * (1 + scale) + shift                               # M(h_{l-1}, A)
        h = h + self.attn(self.norm1(h))                          # Eq. 21, first line
        h = h * (1 + scale) + shift                               # M(h'_l, A)
        return h + self.mlp(self.norm2(h))                        # Eq. 21, second line


class ViT(nn.Module):
    """A plain ViT that classifies clean images and predicts the noise in noisy ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        P, C, D = cfg.patch_size, cfg.channels, cfg.dim
        self.grid = cfg.image_size // P
        N = self.grid * self.grid
        self.num_tokens = N + 1
        time_hidden = cfg.time_hidden or 4 * (N + 1)

        self.patch_embed = nn.Linear(P * P * C, D)                    # E in Eq. 17
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))           # x_class
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))       # E_pos
        self.time_mlp = nn.Sequential(                                # A = MLP_t(t)
            nn.Linear(D, time_hidden), nn.GELU(), nn.Linear(time_hidden, time_hidden))
        self.blocks = nn.ModuleList(
            [Block(D, cfg.heads, cfg.mlp_ratio, N + 1, time_hidden) for _ in range(cfg.depth)])
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, cfg.num_classes))  # Eq. 20 + linear
        self.out = nn.Linear(D, P * P * C)                            # f_r: token -> patch pixels
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the paper's code: xavier-normal weights, zero biases, N(0, 1) positional embedding and CLS."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=1.0)
        nn.init.normal_(self.cls_token, std=1.0)

    # -- patches ---------------------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, P*P*C), patches in raster order, each flattened as (P, P, C)."""
        B, C, H, W = x.shape
        P, G = self.cfg.patch_size, self.grid
        x = x.reshape(B, C, G, P, G, P).permute(0, 2, 4, 3, 5, 1)    # (B, G, G, P, P, C)
        return x.reshape(B, G * G, P * P * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, P*P*C) -> (B, C, H, W); the inverse of patchify."""
        B = x.shape[0]
        P, G, C = self.cfg.patch_size, self.grid, self.cfg.channels
        x = x.reshape(B, G, G, P, P, C).permute(0, 5, 1, 3, 2, 4)    # (B, C, G, P, G, P)
        return x.reshape(B, C, G * P, G * P)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, t: torch.Tensor | None = None, n_plain: int = 0) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1]; t: (B - n_plain,) timesteps for the last rows, or None.
        Returns h_L: (B, N+1, D). The first n_plain images are processed with no time input."""
        h = self.patch_embed(self.patchify(x))                        # (B, N, D)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed  # (B, N+1, D)
        A = None if t is None else self.time_mlp(timestep_embedding(t, self.cfg.dim))  # (B - n_plain, time_hidden)
        for block in self.blocks:
            h = block(h, A, n_plain)
        return h

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Clean images -> logits (B, num_classes), from the CLS token; no time input."""
        return self.head(self.forward_features(x)[:, 0])

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy images x_t and timesteps t -> predicted noise eps, shape (B, C, H, W)."""
        h = self.forward_features(x, t)[:, 1:]                        # (B, N, D), CLS dropped
        return self.unpatchify(self.out(h))                           # (B, C, H, W)

    def classify_and_denoise(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """HybViT's two branches in one pass over the concatenated batch: logits for clean x0 (no time input)
        and predicted noise for x_t. Equal to classify(x0), denoise(xt, t), with bigger matrix products."""
        h = self.forward_features(torch.cat([x0, xt]), t, n_plain=len(x0))  # (B0 + Bt, N+1, D)
        logits = self.head(h[:len(x0), 0])                                   # (B0, classes)
        eps = self.unpatchify(self.out(h[len(x0):, 1:]))                     # (Bt, C, H, W)
        return logits, eps

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(x) if t is None else self.denoise(x, t)

    # -- accounting ------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Forward FLOPs per image (2 per multiply-add) of the transformer trunk, patch embedding and heads."""
        cfg, L = self.cfg, self.num_tokens
        D, hidden, PPC = cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.patch_size ** 2 * cfg.channels
        per_block = 2 * L * (3 * D * D + D * D + 2 * D * hidden) + 2 * 2 * L * L * D
        return float(cfg.depth * per_block + 2 * (L - 1) * PPC * D * 2)


# Parameter count of the paper's official code at its CIFAR-10 configuration (REFERENCE-NOTES).
OFFICIAL_CIFAR10_PARAMS = 11_185_068
