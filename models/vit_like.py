"""A tiny Vision Transformer written in plain PyTorch (test fixture).

A conv2d patch stem (``kernel_size = stride = patch``) followed by
``flatten(2).transpose(1, 2)``, a learnable class token (``nn.Parameter`` of
shape ``(1, 1, hidden)``) expanded to the batch and concatenated in front, a
learned position embedding ``nn.Parameter`` of shape
``(1, n_patches + 1, hidden)``, pre-LN blocks with separate q/k/v Linear
layers (with bias) and non-causal SDPA, a GELU MLP, a final LayerNorm and a
classification ``head`` on the class token ``x[:, 0]``.

``forward(pixel_values)`` with ``pixel_values`` of shape
``(batch, channels, image, image)`` returns logits ``(batch, classes)``.
Only the batch dimension is dynamic; the image size is fixed.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyViT", "ViTAttention", "ViTMLP", "ViTBlock"]


class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention with separate q/k/v."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        assert hidden % heads == 0, "hidden must be divisible by heads"
        self.hidden = hidden
        self.heads = heads
        self.head_dim = hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(b, s, self.hidden)
        return self.out(y)


class ViTMLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LN encoder block."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = ViTAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = ViTMLP(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyViT(nn.Module):
    """Tiny ViT classifier; ``forward(pixel_values) -> logits``."""

    def __init__(self, image: int = 32, patch: int = 8, channels: int = 3,
                 hidden: int = 64, layers: int = 4, heads: int = 4,
                 ffn: int = 128, classes: int = 10):
        super().__init__()
        assert image % patch == 0, "image must be divisible by patch"
        self.image = image
        self.channels = channels
        self.classes = classes
        n_patches = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(channels, hidden, kernel_size=patch,
                                     stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.pos_embed = nn.Parameter(
            torch.randn(1, n_patches + 1, hidden) * 0.02)
        self.blocks = nn.ModuleList(
            [ViTBlock(hidden, heads, ffn) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
