"""A tiny Llama-style decoder written in plain PyTorch (test fixture).

Features: hand-written RMSNorm
(``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight``), rotary
position embeddings with rotate-half (cos/sin computed in ``forward`` from an
``inv_freq`` buffer and ``torch.arange(seq)``), grouped-query attention with
separate bias-free q/k/v projections, kv heads repeated via
``k[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)``, causal
SDPA, a SwiGLU MLP ``down(silu(gate(x)) * up(x))``, a final RMSNorm and an
``lm_head`` whose weight is TIED to the embedding
(``self.lm_head.weight = self.embed.weight``).

``forward(input_ids)`` returns logits of shape ``(batch, seq, vocab)``.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyLlama", "RMSNorm", "LlamaAttention", "LlamaMLP",
           "LlamaBlock", "rotate_half"]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
                * self.weight)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim: (a, b) -> (-b, a)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    """GQA self-attention with RoPE."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        assert heads % kv_heads == 0, "heads must be a multiple of kv_heads"
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        b, kv, s, d = t.shape
        rep = self.heads // self.kv_heads
        return t[:, :, None].expand(b, kv, rep, s, d).reshape(b, kv * rep, s, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = self._repeat_kv(k)
        v = self._repeat_kv(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm decoder block."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 ffn: int):
        super().__init__()
        self.input_norm = RMSNorm(hidden)
        self.attn = LlamaAttention(hidden, heads, kv_heads, head_dim)
        self.post_attn_norm = RMSNorm(hidden)
        self.mlp = LlamaMLP(hidden, ffn)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.input_norm(x), cos, sin)
        x = x + self.mlp(self.post_attn_norm(x))
        return x


class TinyLlama(nn.Module):
    """Tiny Llama language model; ``forward(input_ids) -> logits``."""

    def __init__(self, vocab: int = 97, hidden: int = 64, layers: int = 4,
                 heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                 ffn: int = 128, rope_theta: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0, "head_dim must be even for RoPE"
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            [LlamaBlock(hidden, heads, kv_heads, head_dim, ffn)
             for _ in range(layers)])
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        inv_freq = 1.0 / (rope_theta ** (
            torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        pos = torch.arange(seq, device=input_ids.device,
                           dtype=self.inv_freq.dtype)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed(input_ids)
        cos = emb.cos().to(x.dtype)
        sin = emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))
