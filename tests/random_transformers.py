"""Tiny decoder-only transformers composed from independent construct choices.

``Spec`` names one choice per construct; ``build(spec)`` returns a deterministic model of it
(``torch.manual_seed(spec.seed)``). ``hypothesis`` draws specs in ``tests/test_generated.py``;
the construct tests build single specs by hand. Every construct is written the way models in
the wild write it, so the library sees the ATen pattern it will meet, never a name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Spec", "CHOICES", "build", "inputs"]

VOCAB = 61

# Every construct and the values it may take (the first is the plain default).
CHOICES = {
    "norm": ("rms", "layer", "gemma", "none"),
    "residual": ("pre", "post", "parallel"),
    "qkv": ("separate", "fused", "interleaved"),
    "kv": ("mha", "gqa", "mqa"),
    "repeat": ("interleave", "expand", "index"),
    "attention": ("sdpa", "eager", "bmm", "einsum"),
    "mlp": ("plain", "gated", "fused"),
    "tied": (False, True),
    "positions": ("learned", "rotary", "alibi"),
    "bias": (False, True),
    "qk_norm": (False, True),
    "embed_scale": (False, True),
    "mixer": (None, "mlp_cumsum", "mlp_sort", "mlp_fft", "head_flip"),
}


@dataclass(frozen=True)
class Spec:
    norm: str = "rms"
    residual: str = "pre"
    qkv: str = "separate"
    kv: str = "mha"
    repeat: str = "interleave"
    attention: str = "sdpa"
    mlp: str = "plain"
    tied: bool = False
    positions: str = "learned"
    bias: bool = False
    qk_norm: bool = False
    embed_scale: bool = False
    mixer: str | None = None
    hidden: int = 32
    heads: int = 4
    head_dim: int = 8
    ffn: int = 48
    layers: int = 3
    seed: int = 0

    @property
    def kv_heads(self) -> int:
        return {"mha": self.heads, "gqa": self.heads // 2, "mqa": 1}[self.kv]

    def with_(self, **changes) -> "Spec":
        return replace(self, **changes)


class GemmaNorm(nn.Module):
    """RMSNorm whose gain is ``1 + w`` (w starts near zero)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (1 + self.weight)


def norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=1e-6)
    if kind == "gemma":
        return GemmaNorm(dim)
    return nn.Identity()


def rotate(x, positions):
    """Rotary embedding on the last dim of (b, h, s, d)."""
    d = x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions[:, None].float() * freqs[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        h, kv, d, e = spec.heads, spec.kv_heads, spec.head_dim, spec.hidden
        if spec.qkv == "separate":
            self.q = nn.Linear(e, h * d, bias=spec.bias)
            self.k = nn.Linear(e, kv * d, bias=spec.bias)
            self.v = nn.Linear(e, kv * d, bias=spec.bias)
        else:
            self.qkv = nn.Linear(e, (h + 2 * kv) * d, bias=spec.bias)
        self.o = nn.Linear(h * d, e, bias=spec.bias)
        if spec.qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        if spec.positions == "alibi":
            self.register_buffer("slopes", torch.tensor([2.0 ** (-(i + 1)) for i in range(h)]), persistent=False)

    def project(self, x):
        spec = self.spec
        b, s, _ = x.shape
        h, kv, d = spec.heads, spec.kv_heads, spec.head_dim
        if spec.qkv == "separate":
            return (self.q(x).view(b, s, h, d), self.k(x).view(b, s, kv, d), self.v(x).view(b, s, kv, d))
        fused = self.qkv(x)
        if spec.qkv == "fused":
            q, k, v = fused.split([h * d, kv * d, kv * d], dim=-1)
            return q.view(b, s, h, d), k.view(b, s, kv, d), v.view(b, s, kv, d)
        # interleaved: per kv group, its query heads then one key and one value (Falcon's layout)
        grouped = fused.view(b, s, kv, h // kv + 2, d)
        q = grouped[:, :, :, : h // kv].reshape(b, s, h, d)
        if spec.repeat == "index":
            k, v = grouped[..., [-2], :], grouped[..., [-1], :]
        else:
            k, v = grouped[:, :, :, -2:-1], grouped[:, :, :, -1:]
        return q, k.reshape(b, s, kv, d), v.reshape(b, s, kv, d)

    def repeat_kv(self, t):
        """(b, kv, s, d) → (b, h, s, d)."""
        spec = self.spec
        rep = spec.heads // spec.kv_heads
        if rep == 1:
            return t
        b, kv, s, d = t.shape
        if spec.repeat == "expand":
            return t[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)
        if spec.repeat == "index" and kv == 1:
            return t[:, [0] * rep]
        return t.repeat_interleave(rep, dim=1)

    def forward(self, x):
        spec = self.spec
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.positions == "rotary":
            positions = torch.arange(s, device=x.device)
            q, k = rotate(q, positions), rotate(k, positions)
        if spec.mixer == "head_flip":
            v = v.flip(-1)          # order-dependent on the value dim
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        out = self.attend(q, k, v, b, s)
        return self.o(out.transpose(1, 2).reshape(b, s, spec.heads * spec.head_dim))

    def bias_and_mask(self, s, device):
        causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        mask = torch.zeros(s, s, device=device).masked_fill(~causal, float("-inf"))
        if self.spec.positions == "alibi":
            distance = torch.arange(s, device=device)[None, :] - torch.arange(s, device=device)[:, None]
            return mask + self.slopes[:, None, None] * distance.float()     # (h, s, s)
        return mask

    def attend(self, q, k, v, b, s):
        spec = self.spec
        h, d = spec.heads, spec.head_dim
        mask = self.bias_and_mask(s, q.device)
        if spec.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if spec.attention == "eager":
            weights = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
            return weights.softmax(-1) @ v
        if spec.attention == "einsum":
            weights = torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2)) / math.sqrt(d)
            weights = (weights + mask).softmax(-1)
            return torch.einsum("bhqk,bkhd->bqhd", weights, v.transpose(1, 2)).transpose(1, 2)
        # merged batch: (b, h, s, d) → (b·h, s, d), then bmm
        qm, km, vm = (t.reshape(b * h, s, d) for t in (q, k, v))
        weights = torch.bmm(qm, km.transpose(1, 2)) / math.sqrt(d)
        weights = (weights.view(b, h, s, s) + mask).view(b * h, s, s).softmax(-1)
        return torch.bmm(weights, vm).view(b, h, s, d)


class Mlp(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        e, f = spec.hidden, spec.ffn
        if spec.mlp == "fused":
            self.gate_up = nn.Linear(e, 2 * f, bias=spec.bias)
        else:
            self.up = nn.Linear(e, f, bias=spec.bias)
            if spec.mlp == "gated":
                self.gate = nn.Linear(e, f, bias=spec.bias)
        self.down = nn.Linear(f, e, bias=spec.bias)

    def forward(self, x):
        spec = self.spec
        if spec.mlp == "fused":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        elif spec.mlp == "gated":
            hidden = F.silu(self.gate(x)) * self.up(x)
        else:
            hidden = F.gelu(self.up(x))
        if spec.mixer == "mlp_cumsum":
            hidden = hidden.cumsum(-1) / spec.ffn
        elif spec.mixer == "mlp_sort":
            hidden = hidden.sort(-1).values
        elif spec.mixer == "mlp_fft":
            hidden = torch.fft.rfft(hidden, dim=-1).abs()[..., : spec.ffn // 2]
            hidden = torch.cat([hidden, hidden], -1)
        return self.down(hidden)


class Block(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.norm1, self.norm2 = norm(spec.norm, spec.hidden), norm(spec.norm, spec.hidden)
        self.attn, self.mlp = Attention(spec), Mlp(spec)

    def forward(self, x):
        residual = self.spec.residual
        if residual == "pre":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if residual == "post":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        y = self.norm1(x)
        return x + self.attn(y) + self.mlp(y)


class RandomTransformer(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(VOCAB, spec.hidden)
        if spec.positions == "learned":
            self.position = nn.Embedding(32, spec.hidden)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.final_norm = norm(spec.norm, spec.hidden)
        self.head = nn.Linear(spec.hidden, VOCAB, bias=False)
        if spec.tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        if self.spec.embed_scale:
            x = x * (self.spec.hidden ** 0.5)
        if self.spec.positions == "learned":
            x = x + self.position(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final_norm(x))


def build(spec: Spec) -> nn.Module:
    torch.manual_seed(spec.seed)
    return RandomTransformer(spec).eval()


def inputs(batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)),)
