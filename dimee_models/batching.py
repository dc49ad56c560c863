"""Texts to model inputs, batch by batch: what training, cached exit outputs and offline prediction
share (the serving tiers pad token ids themselves, deployments/tier.py)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from dimee_models.data import TextDataset


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], pairs: list[str] | None, max_length: int) -> dict:
    """Tokenize with padding to the longest text of this batch only (dynamic padding)."""
    return tokenizer(
        texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )


def batches(ds: TextDataset, tokenizer, batch_size: int, max_length: int, order: np.ndarray | None = None):
    """Yield (encoded inputs, label tensor) batches in `order` (default: dataset order)."""
    order = np.arange(len(ds)) if order is None else order
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        texts = [ds.texts[i] for i in idx]
        pairs = [ds.text_pairs[i] for i in idx] if ds.text_pairs is not None else None
        yield encode(tokenizer, texts, pairs, max_length), torch.tensor([ds.labels[i] for i in idx], dtype=torch.long)


def model_inputs(enc: dict) -> dict:
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
