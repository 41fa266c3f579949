"""Encoder prompts: the token view of a (partial) patient that the encoder reads.

A prompt is ``<s> (<v> item* </v>)* </s>`` where an item is a code token or ``<mask>``
(BART-style infilling: each run of hidden codes inside a visit becomes one ``<mask>``). Plain
generation conditions on demographics alone, whose prompt is ``<s> </s>`` (the training
objective's "demographics only" view); retrieve-and-edit shows the kept codes of a retrieved
training patient. Batches are right-padded with ``<pad>`` and an attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.vocab import BOS, END_VISIT, EOS, MASK, VISIT, Vocabulary

__all__ = ["empty_prompt", "pad_prompts", "prompt_ids"]


def prompt_ids(vocab: Vocabulary, visits: Sequence[Sequence[str | None]]) -> list[int]:
    """Token ids of a prompt; ``None`` items are hidden codes (runs collapse to one ``<mask>``).

    Codes outside the vocabulary are hidden too.
    """
    ids = [vocab.index[BOS]]
    mask_id = vocab.index[MASK]
    for visit in visits:
        ids.append(vocab.index[VISIT])
        for item in visit:
            token = mask_id if item is None else vocab.index.get(item, mask_id)
            if token == mask_id and ids[-1] == mask_id:
                continue
            ids.append(token)
        ids.append(vocab.index[END_VISIT])
    ids.append(vocab.index[EOS])
    return ids


def empty_prompt(vocab: Vocabulary) -> list[int]:
    """``<s> </s>``: demographics only."""
    return [vocab.index[BOS], vocab.index[EOS]]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``int64 [B, S]`` ids and attention mask."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return ids, mask
