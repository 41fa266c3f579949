"""Counter-based random numbers and sampling restricted to allowed tokens.

Randomness is a pure function of ``(seed, patient index, stream, step)`` (SplitMix64 mixing,
Steele et al. 2014), so a patient's draws do not depend on which other patients share its batch,
on the batch size or on the order of work: the same request and seed give the same patients.
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_keys", "sample_tokens", "uniforms"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def row_keys(seed: int | np.ndarray, index: np.ndarray,
             stream: np.ndarray | int = 0) -> np.ndarray:
    """One 64-bit key per row from the request seed, patient index and stream number.

    ``seed`` is one int for every row or one ``uint64`` per row (rows of different requests
    decoded together); row ``r``'s key depends on ``(seed[r], index[r], stream[r])`` only.
    """
    index = np.asarray(index, dtype=np.uint64)
    stream = np.broadcast_to(np.asarray(stream, dtype=np.uint64), index.shape)
    if np.ndim(seed) == 0:
        seeds = np.full(index.shape, np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    else:
        seeds = np.broadcast_to(np.asarray(seed, dtype=np.uint64), index.shape)
    key = _mix(seeds)
    key = _mix(key ^ _mix(index))
    return _mix(key ^ _mix(stream + np.uint64(0x5851F42D4C957F2D)))


def uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """Uniform float64 in [0, 1) per key for decoding step ``step``."""
    bits = _mix(keys ^ _mix(np.full(keys.shape, np.uint64(step), dtype=np.uint64)))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def sample_tokens(logits: np.ndarray, allowed: np.ndarray, u: np.ndarray,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Draw one column per row from ``softmax(logits / temperature)`` over allowed columns.

    ``top_k`` (0 = off) and ``top_p`` (1 = off) are applied after the mask, so they only ever
    choose among allowed tokens. Inverse-CDF sampling with one uniform ``u`` per row: no
    per-token random numbers, and no sort or partition unless ``top_k``/``top_p`` ask for one.
    Every row must allow at least one column.
    """
    x = np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)
    if temperature != 1.0:
        x *= np.float32(1.0 / temperature)
    width = x.shape[1]
    if 0 < top_k < width:
        kth = np.partition(x, width - top_k, axis=1)[:, width - top_k]
        x[x < kth[:, None]] = -np.inf
    x -= x.max(axis=1, keepdims=True)
    p = np.exp(x)
    rows = np.arange(x.shape[0])
    if top_p < 1.0:
        order = np.argsort(-p, axis=1, kind="stable")
        ps = np.take_along_axis(p, order, axis=1)
        cs = np.cumsum(ps, axis=1)
        ps[(cs - ps) >= np.float32(top_p) * cs[:, -1:]] = 0.0
        cdf = np.cumsum(ps, axis=1)
        idx = _search(cdf, u)
        chosen = order[rows, idx]
    else:
        cdf = np.cumsum(p, axis=1)
        chosen = _search(cdf, u)
    # Rounding can land on a zero-probability column when u is within 2^-24 of 1.
    bad = p[rows, chosen] <= 0.0
    if bad.any():
        chosen[bad] = np.argmax(p[bad], axis=1)
    return chosen.astype(np.int64)


def _search(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    target = (u * cdf[:, -1]).astype(np.float32)
    return np.argmax(cdf > target[:, None], axis=1)
