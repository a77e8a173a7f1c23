"""Test session settings: one intra-op thread (tiny models run faster without thread overhead)."""
import torch

torch.set_num_threads(1)
