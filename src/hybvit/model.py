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

from .augment import GEOMETRIC
from .config import ModelConfig

MLP_RATIO = 2                        # the MLP is twice as wide as the token, as in the paper's code


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps. t: (B,) -> (B, dim): [sin(t f_i), cos(t f_i)] with
    f_i = max_period^(-i / (half - 1)), i = 0..half-1, as the paper's code (its SinusoidalPosEmb), so the lowest
    frequency is exactly 1 / max_period; the official checkpoints need exactly this (tests/test_official.py)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / max(half - 1, 1)
                      * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.float()[:, None] * freqs[None]                      # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _CPUAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v (Eq. 16) from the fused qkv projection, with a hand-written backward.

    Used for bf16 on the CPU only. There, at ViT sequence lengths (65 tokens), torch's CPU flash-attention kernel
    runs forward + backward ~5x slower than explicit batched products, and autograd through the explicit form spends
    much of its time re-laying-out gradients (the backward of unbind + permute is a stack and a strided copy).
    This version gathers q, k, v once and writes dq, dk, dv straight into the fused layout; in fp32 and on CUDA,
    F.scaled_dot_product_attention is the faster path and is used instead. Checked against autograd by gradcheck
    (tests/test_model.py); timed by benchmarks/train_step.py."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        B, L, D3 = qkv.shape                                          # qkv: (B, L, 3 D), last dim (3, heads, d)
        d = D3 // 3 // heads
        qkv5 = qkv.view(B, L, 3, heads, d)
        q, k, v = (qkv5[:, :, i].transpose(1, 2).reshape(B * heads, L, d) for i in range(3))  # (B h, L, d)
        with torch.autocast("cpu", enabled=False):
            p = torch.bmm(q, k.transpose(1, 2)).mul_(d ** -0.5).softmax(dim=-1)                   # (B h, L, L)
            o = torch.bmm(p, v)                                                                    # (B h, L, d)
        ctx.save_for_backward(q, k, v, p)
        ctx.heads = heads
        return o.view(B, heads, L, d).transpose(1, 2).reshape(B, L, heads * d)                 # (B, L, D)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, k, v, p = ctx.saved_tensors
        B, L, D = g.shape
        H, d = ctx.heads, D // ctx.heads
        with torch.autocast("cpu", enabled=False):
            go = g.to(v.dtype).reshape(B, L, H, d).transpose(1, 2).reshape(B * H, L, d)         # (B h, L, d)
            dv = torch.bmm(p.transpose(1, 2), go)
            ds = torch._softmax_backward_data(torch.bmm(go, v.transpose(1, 2)), p, -1, p.dtype).mul_(d ** -0.5)
            dq, dk = torch.bmm(ds, k), torch.bmm(ds.transpose(1, 2), q)
        dqkv = torch.empty(B, L, 3, H, d, dtype=q.dtype, device=q.device)
        for i, grad in enumerate((dq, dk, dv)):
            dqkv[:, :, i] = grad.view(B, H, L, d).transpose(1, 2)
        return dqkv.view(B, L, 3 * D), None


class Attention(nn.Module):
    """Multi-head self-attention (Eq. 16), qkv without bias: F.scaled_dot_product_attention, or _CPUAttention for
    bf16 on the CPU."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, queries: int = 0) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D); with queries > 0 only the first `queries` positions attend (keys and values
        still come from all L), giving (B, queries, D): the same rows, for a fraction of the work."""
        B, L, D = x.shape
        if queries:
            H, d = self.heads, D // self.heads
            q = F.linear(x[:, :queries], self.qkv.weight[:D]).reshape(B, queries, H, d).transpose(1, 2)
            k, v = F.linear(x, self.qkv.weight[D:]).reshape(B, L, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)               # (B, H, queries, L)
            x = scores.softmax(dim=-1) @ v                                # (B, H, queries, d)
            return self.proj(x.transpose(1, 2).reshape(B, queries, D))
        qkv = self.qkv(x)                                             # (B, L, 3 D)
        if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
            return self.proj(_CPUAttention.apply(qkv, self.heads))   # (B, L, D)
        q, k, v = qkv.reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)                   # (B, heads, L, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))          # (B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block with time conditioning.

    time_cond "token-scalar": the paper's per-token time modulation M(h, A) (Eq. 21).
    time_cond "adaln": per-channel adaptive LayerNorm (shift, scale) and a residual gate for each sub-block, from a
    zero-initialised Linear(A) as DiT's adaLN-Zero; the gate is applied as (1 + gate), so zero modulation is
    exactly the plain block, the classification path. The MLP is MLP_RATIO times as wide as the token."""

    def __init__(self, dim: int, heads: int, tokens: int, time_dim: int, time_cond: str = "token-scalar"):
        super().__init__()
        self.time_cond = time_cond
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        if time_cond == "token-scalar":
            self.modulation = nn.Linear(time_dim, 2 * tokens)      # one (scale, shift) scalar pair per token
        elif time_cond == "adaln":
            self.modulation = nn.Linear(time_dim, 6 * dim)         # (shift, scale, gate) per channel, twice

    def forward(self, h: torch.Tensor, A: torch.Tensor | None = None, n_plain: int = 0,
                cls_only: bool = False) -> torch.Tensor:
        # h: (B, L, D); A: (B - n_plain, time_dim) or None (no time input: a plain ViT block, Eq. 18-19).
        # The first n_plain rows of h get no modulation (zero modulation is exactly "no time input").
        # cls_only (plain rows only): return just the CLS position, (B, 1, D), computing attention for that one
        # query and the MLP for that one token: what the classifier head needs from the last block.
        if cls_only:
            assert A is None
            h = h[:, :1] + self.attn(self.norm1(h), queries=1)     # Eq. 18 for the CLS token
            return h + self.mlp(self.norm2(h))                     # Eq. 19
        if A is None:
            h = h + self.attn(self.norm1(h))                      # Eq. 18
            return h + self.mlp(self.norm2(h))                    # Eq. 19
        mod = self.modulation(F.silu(A))
        if n_plain:
            mod = F.pad(mod, (0, 0, n_plain, 0))                  # zero rows for the plain images
        if self.time_cond == "adaln":
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.unsqueeze(1).chunk(6, dim=-1)  # each (B, 1, D)
            h = h + (1 + gate1) * self.attn(self.norm1(h) * (1 + scale1) + shift1)
            return h + (1 + gate2) * self.mlp(self.norm2(h) * (1 + scale2) + shift2)
        scale, shift = mod.unsqueeze(-1).chunk(2, dim=1)          # each (B, L, 1)
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
        time_hidden = 4 * (N + 1)                                     # the width of the paper's code

        self.patch_embed = nn.Linear(P * P * C, D)                    # E in Eq. 17
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))           # x_class
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))       # E_pos
        self.time_mlp = nn.Sequential(                                # A = MLP_t(t)
            nn.Linear(D, time_hidden), nn.GELU(), nn.Linear(time_hidden, time_hidden))
        if cfg.class_cond:                                            # A += e_y; row num_classes: "no label"
            self.label_embed = nn.Embedding(cfg.num_classes + 1, time_hidden)
        if cfg.augment_cond:                                          # A += e_a; row 0 (no transform) stays 0
            self.augment_embed = nn.Embedding(len(GEOMETRIC), time_hidden, padding_idx=0)
        tokens = N + 1 + int(cfg.time_token)                          # CLS, patches (, time)
        self.blocks = nn.ModuleList(
            [Block(D, cfg.heads, tokens, time_hidden, cfg.time_cond) for _ in range(cfg.depth)])
        if cfg.time_token:                                            # U-ViT: time as a token
            self.time_token = nn.Linear(time_hidden, D)
        if cfg.long_skips:                                            # U-ViT: block i -> block depth-1-i
            self.skip_proj = nn.ModuleList([nn.Linear(2 * D, D) for _ in range(cfg.depth // 2)])
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
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=1.0)
        nn.init.normal_(self.cls_token, std=1.0)
        for block in self.blocks:                                     # adaLN-Zero: modulation starts at zero
            if block.time_cond == "adaln":
                nn.init.zeros_(block.modulation.weight)
                nn.init.zeros_(block.modulation.bias)
        if self.cfg.class_cond:                                       # small, as DiT's label table
            nn.init.normal_(self.label_embed.weight, std=0.02)
        if self.cfg.augment_cond:                                     # no effect until trained
            nn.init.zeros_(self.augment_embed.weight)
        if self.cfg.zero_init_out:
            nn.init.zeros_(self.out.weight)

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
    def time_features(self, t: torch.Tensor, y: torch.Tensor | None = None,
                      aug: torch.Tensor | None = None) -> torch.Tensor:
        """Timesteps (B,) -> A = MLP_t(sinusoidal(t)), (B, time_hidden). With model.class_cond the label embedding
        of y (B,) is added; y None or num_classes means "no label" (the unconditional denoiser). With
        model.augment_cond the embedding of the geometric transform aug (B,) is added; None or 0 = untransformed."""
        A = self.time_mlp(timestep_embedding(t, self.cfg.dim))
        if self.cfg.class_cond:
            if y is None:
                y = torch.full_like(t, self.cfg.num_classes, dtype=torch.long)
            A = A + self.label_embed(y).to(A.dtype)
        if self.cfg.augment_cond and aug is not None:
            A = A + self.augment_embed(aug).to(A.dtype)
        return A                                                      # (B, time_hidden)

    def forward_features(self, x: torch.Tensor, t: torch.Tensor | None = None, n_plain: int = 0,
                         cls_rows: int = 0, A: torch.Tensor | None = None):
        """x: (B, C, H, W) in [-1, 1]; t: (B - n_plain,) timesteps for the last rows, or None.
        The first n_plain images are processed with no time input. Returns h_L: (B, N+1, D).

        cls_rows > 0 (at most n_plain, or B when t is None): the first cls_rows images only need their CLS output,
        so the last block computes that token alone (~8 % fewer FLOPs for a classification pass, same values);
        returns (h_cls (cls_rows, D), h_L of the other rows (B - cls_rows, N+1, D) or None).
        A: the time features of t when the caller has them already (time_features(t))."""
        h = self.patch_embed(self.patchify(x))                        # (B, N, D)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed  # (B, N+1, D)
        if A is None and t is not None:
            A = self.time_features(t)                                 # (B - n_plain, time_hidden)
        if A is not None and self.cfg.time_token:
            if n_plain:
                raise ValueError("model.plus (its time token) needs separate passes for clean and noisy images")
            h = torch.cat([h, self.time_token(A)[:, None]], dim=1)   # (B, N+2, D)
        depth, half = len(self.blocks), self.cfg.depth // 2
        skips = []
        for i, block in enumerate(self.blocks):
            if self.cfg.long_skips and i >= depth - half:            # U-ViT: block j's output into block depth-1-j
                h = self.skip_proj[i - (depth - half)](torch.cat([h, skips.pop()], dim=-1))
            if i == depth - 1 and cls_rows:
                h_cls = block(h[:cls_rows], None, cls_only=True)[:, 0]            # (cls_rows, D)
                rest = block(h[cls_rows:], A, n_plain - cls_rows) if cls_rows < len(h) else None
                return h_cls, rest
            h = block(h, A, n_plain)
            if self.cfg.long_skips and i < half:
                skips.append(h)
        return h

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Clean images -> logits (B, num_classes), from the CLS token; no time input."""
        return self.head(self.forward_features(x, cls_rows=len(x))[0])

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """The denoiser's output layer: patch tokens h (B, N, D) -> (B, C, H, W)."""
        return self.unpatchify(self.out(h))

    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                aug: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy images x_t and timesteps t -> predicted noise eps, shape (B, C, H, W). y: class labels (B,)
        (model.class_cond only; None = unconditional); aug: the geometric transforms the training images got
        (model.augment_cond only; None = none, as sampling)."""
        A = self.time_features(t, y, aug)                             # (B, time_hidden)
        h = self.forward_features(x, t, A=A)[:, 1:1 + self.grid ** 2]  # (B, N, D): patches only
        return self.output(h)                                         # (B, C, H, W)

    def classify_and_denoise(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                             y: torch.Tensor | None = None, aug: torch.Tensor | None = None):
        """HybViT's two branches in one pass over the concatenated batch: logits for clean x0 (no time input)
        and predicted noise for x_t. Equal to classify(x0), denoise(xt, t, y, aug), with bigger matrix products."""
        if self.cfg.time_token:                                      # sequences of different lengths
            return self.classify(x0), self.denoise(xt, t, y, aug)
        A = self.time_features(t, y, aug)                                     # (Bt, time_hidden)
        h_cls, h = self.forward_features(torch.cat([x0, xt]), t, n_plain=len(x0), cls_rows=len(x0), A=A)
        logits = self.head(h_cls)                                            # (B0, classes)
        eps = self.output(h[:, 1:])                                          # (Bt, C, H, W)
        return logits, eps

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None,
                aug: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(x) if t is None else self.denoise(x, t, y, aug)

    # -- accounting ------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Forward FLOPs per image (2 per multiply-add) of the transformer trunk, patch embedding and heads."""
        cfg, L = self.cfg, self.num_tokens
        D, hidden, PPC = cfg.dim, MLP_RATIO * cfg.dim, cfg.patch_size ** 2 * cfg.channels
        L += int(cfg.time_token)
        per_block = 2 * L * (3 * D * D + D * D + 2 * D * hidden) + 2 * 2 * L * L * D
        skips = (cfg.depth // 2) * 2 * L * 2 * D * D if cfg.long_skips else 0
        return float(cfg.depth * per_block + skips + 2 * (L - 1) * PPC * D * 2)


# Parameter count of the paper's official code at its CIFAR-10 configuration (REFERENCE-NOTES).
OFFICIAL_CIFAR10_PARAMS = 11_185_068
