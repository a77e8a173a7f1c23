"""A tiny text classifier built on ``torch.nn.TransformerEncoder`` (fixture).

``nn.Embedding`` -> ``nn.TransformerEncoder`` of pre-LN
(``norm_first=True``), ``batch_first=True``, dropout-free
``nn.TransformerEncoderLayer`` s -> mean over tokens -> ``nn.Linear`` head.

``forward(input_ids)`` returns logits of shape ``(batch, classes)``.

Note: ``nn.TransformerEncoder`` is constructed with
``enable_nested_tensor=False`` (nested tensors are only used with a padding
mask anyway, and the flag silences a warning about ``norm_first=True``).
In eval mode PyTorch may route eager inference through the fused
"fast path" (``torch._transformer_encoder_layer_fwd``); under
``torch.export`` the regular decomposed path is traced, so eager and
exported outputs agree only up to float tolerance.
"""

import torch
from torch import nn

__all__ = ["TinyEncoderClassifier"]


class TinyEncoderClassifier(nn.Module):
    """Embedding + TransformerEncoder + mean pooling + linear head."""

    def __init__(self, vocab: int = 97, hidden: int = 64, layers: int = 2,
                 heads: int = 4, ffn: int = 128, classes: int = 5):
        super().__init__()
        self.vocab = vocab
        self.classes = classes
        self.embed = nn.Embedding(vocab, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, ffn, dropout=0.0, batch_first=True,
            norm_first=True)
        self.encoder = nn.TransformerEncoder(
            layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(input_ids))
        return self.head(x.mean(dim=1))
