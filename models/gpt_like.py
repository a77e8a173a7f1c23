"""A tiny pre-LayerNorm GPT written in plain PyTorch (test fixture).

Structure: token embedding + learned position embedding, ``layers`` blocks of
``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, a final LayerNorm and an
*untied* ``lm_head``.  Attention uses ONE fused ``qkv`` Linear (out features
``3 * hidden``) that is split with ``.split(hidden, dim=-1)``; heads are formed
with ``view``/``transpose`` and attention is computed with
``F.scaled_dot_product_attention(is_causal=True)``.

``forward(input_ids)`` returns logits of shape ``(batch, seq, vocab)``.
``seq`` must not exceed ``max_pos``.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyGPT", "GPTAttention", "GPTMLP", "GPTBlock"]


class GPTAttention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        assert hidden % heads == 0, "hidden must be divisible by heads"
        self.hidden = hidden
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(self.hidden, dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, s, self.hidden)
        return self.proj(y)


class GPTMLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc = nn.Linear(hidden, ffn)
        self.act = nn.GELU()
        self.proj = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GPTBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = GPTAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = GPTMLP(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyGPT(nn.Module):
    """Tiny GPT language model; ``forward(input_ids) -> logits``."""

    def __init__(self, vocab: int = 97, hidden: int = 64, layers: int = 4,
                 heads: int = 4, ffn: int = 256, max_pos: int = 64):
        super().__init__()
        self.vocab = vocab
        self.max_pos = max_pos
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(max_pos, hidden)
        self.blocks = nn.ModuleList(
            [GPTBlock(hidden, heads, ffn) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        pos = torch.arange(seq, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)[None]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
