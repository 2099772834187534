"""Sequence packing for the scoring pass and the train step (host side, NumPy).

Unpacked, every sequence costs P + N - 1 forward positions whatever its real length. Packed,
each sequence's *input* (its real prompt tokens, then its response tokens up to the one
before its last valid token: the hidden state at input index k - 1 + j predicts response
token j) is laid into rows of ``max_tokens_per_row`` tokens, first-fit-decreasing by
length, with per-row segment ids (1, 2, ...; 0 = padding) and per-segment positions, and
the row length is trimmed to the bucketed longest row (``rollout.bucket_length``).

Micro-batches: with packing, a micro-batch is ``rows_per_micro`` packed rows (as many
micro-batches as the rows need; a row costs what one unpacked sequence of the budget
costs, so the configured micro-batch memory holds). The rows are balanced over the
(micro-batch, device) blocks by token count and laid out [M*R, L] in the strided order of
``step._split_micro`` (micro-batch m = rows m, m+M, ...; each device holds a contiguous
block of R/D rows of every micro-batch). Each sequence lies in one row, so sequence-level
objectives see whole sequences; ``micro`` [B] says which micro-batch holds sequence b, and
the gather indices (``row``, ``col`` [B,N]) are local to that micro-batch.

Shapes vary with the content: the row width (bucketed) and the number of micro-batches M
(rows / rows_per_micro) are static shapes, so each new (M, width) pair compiles the step
once (few buckets; M <= sequences / rows_per_micro).

Per-token outputs come back exactly: ``logp_packed[row, col]`` is sequence b's value for
response token j where ``valid[b, j]`` (j < its last valid token + 1), 0 elsewhere.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from espo_jax.rollout.sampler import bucket_length

# Per packed row [M*R, L] (split into micro-batches) / per sequence [B, ...] / [M].
ROW_KEYS = ("pack_ids", "pack_segment_ids", "pack_positions", "pack_targets")
KEYS = ROW_KEYS + ("pack_row", "pack_col", "pack_valid", "pack_micro")


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Packed rows of one minibatch (R rows per micro-batch, M micro-batches).

    ids, segment_ids, positions, targets: i32[M*R, L] (targets: the response token that
    each position predicts, 0 where none); row, col: i32[B, N] (micro-batch-local row and
    column of the position predicting response token j of sequence b); valid: bool[B, N];
    micro: i32[B] (the micro-batch holding sequence b; 0 for empty sequences).
    """
    ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    row: np.ndarray
    col: np.ndarray
    valid: np.ndarray
    micro: np.ndarray
    num_micro: int

    def arrays(self) -> dict:
        """The batch-dict entries (``KEYS``) that the score / train step read."""
        return dict(pack_ids=self.ids, pack_segment_ids=self.segment_ids,
                    pack_positions=self.positions, pack_targets=self.targets,
                    pack_row=self.row, pack_col=self.col, pack_valid=self.valid,
                    pack_micro=self.micro)

    @property
    def tokens(self) -> int:
        """Real (non-padding) positions over all rows."""
        return int((self.segment_ids > 0).sum())


def sequence_lengths(prompt_mask, mask) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens k i64[B], response length n i64[B] = last valid token + 1, 0 if none)."""
    k = (np.asarray(prompt_mask) != 0).sum(1)
    m = np.asarray(mask) != 0
    n = np.where(m.any(1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)
    return k.astype(np.int64), n.astype(np.int64)


def first_fit_decreasing(lengths, budget: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= budget; items of length 0 are left out.

    Items longest first, each into the first bin with room (stable for ties)."""
    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, left in enumerate(room):
            if lengths[i] <= left:
                bins[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def balance(loads, num_devices: int) -> list[int]:
    """Order of rows (len(loads) = D * rows per device) so that the D contiguous blocks have
    near-equal token sums: heaviest first, each to the lightest block with room."""
    r = len(loads)
    if r % num_devices:
        raise ValueError(f"{r} rows do not split over {num_devices} devices")
    cap = r // num_devices
    blocks: list[list[int]] = [[] for _ in range(num_devices)]
    tot = [0] * num_devices
    for i in sorted(range(r), key=lambda i: -loads[i]):
        d = min((d for d in range(num_devices) if len(blocks[d]) < cap), key=lambda d: tot[d])
        blocks[d].append(i)
        tot[d] += loads[i]
    return [i for blk in blocks for i in blk]


def pack(prompt_tokens, prompt_mask, tokens, mask, *, max_tokens_per_row: int,
         rows_per_micro: int = 0, num_devices: int = 1) -> PackedBatch:
    """Pack a minibatch (left-padded prompts i32[B,P] + prompt_mask, responses i32[B,N] +
    mask) into rows of ``max_tokens_per_row`` tokens; see the module docstring.

    ``rows_per_micro`` > 0 (a multiple of ``num_devices``): micro-batches of that many rows,
    as many as the rows need (M = ceil(rows / rows_per_micro)); 0: one micro-batch of all
    rows (rounded up to a multiple of ``num_devices``). Rows are balanced over the M x D
    (micro-batch, device) blocks by token count; empty rows pad. A sequence longer than
    the budget raises ValueError naming train.max_tokens_per_row.
    """
    prompt_tokens, tokens = np.asarray(prompt_tokens), np.asarray(tokens)
    b, p = prompt_tokens.shape
    n_max = tokens.shape[1]
    budget, d = int(max_tokens_per_row), int(num_devices)
    if rows_per_micro % d:
        raise ValueError(f"micro-batches of {rows_per_micro} packed rows do not split over "
                         f"{d} batch devices")
    k, n = sequence_lengths(prompt_mask, mask)
    if np.any((n > 0) & (k == 0)):
        raise ValueError("packing needs at least one real prompt token per sequence")
    length = np.where(n > 0, k + n - 1, 0)
    if length.max(initial=0) > budget:
        raise ValueError(f"train.max_tokens_per_row={budget} is shorter than a sequence of "
                         f"{int(length.max())} tokens (prompt + response - 1); "
                         f"use >= {p + n_max - 1} or 0 (packing off)")
    rows = first_fit_decreasing([int(x) for x in length], budget)
    per_micro = rows_per_micro or max(d, -(-len(rows) // d) * d)
    m_count = max(1, -(-len(rows) // per_micro))
    rows = rows + [[] for _ in range(m_count * per_micro - len(rows))]
    loads = [sum(int(length[i]) for i in rw) for rw in rows]
    order = balance(loads, m_count * d)                # M*D blocks of per_micro / d rows
    cap = per_micro // d
    longest = max(max(loads), 1)
    width = min(bucket_length(longest), max(budget, longest))
    shape = (m_count * per_micro, width)
    ids, seg, pos, tgt = (np.zeros(shape, np.int32) for _ in range(4))
    row = np.zeros((b, n_max), np.int32)
    col = np.zeros((b, n_max), np.int32)
    micro = np.zeros((b,), np.int32)
    valid = np.arange(n_max)[None, :] < n[:, None]
    pmask = np.asarray(prompt_mask) != 0
    for slot, src in enumerate(order):
        q, c = divmod(slot, cap)                       # block q = (device q // M, micro q % M)
        m, local = q % m_count, (q // m_count) * cap + c
        g = m + m_count * local                        # strided layout (step._split_micro)
        start = 0
        for s, i in enumerate(rows[src], start=1):
            ki, ni, li = int(k[i]), int(n[i]), int(length[i])
            ids[g, start:start + li] = np.concatenate([prompt_tokens[i][pmask[i]],
                                                       tokens[i, :ni - 1]])
            seg[g, start:start + li] = s
            pos[g, start:start + li] = np.arange(li)
            tgt[g, start + ki - 1:start + li] = tokens[i, :ni]
            row[i, :ni] = local
            col[i, :ni] = start + ki - 1 + np.arange(ni)
            micro[i] = m
            start += li
    return PackedBatch(ids, seg, pos, tgt, row, col, valid, micro, m_count)


def unpack(packed_values, packed: PackedBatch, fill=0.0) -> np.ndarray:
    """Per-position values [M*R, L] -> per-sequence [B, N] (``fill`` where not valid)."""
    v = np.asarray(packed_values)
    g = packed.micro[:, None] + packed.num_micro * packed.row
    return np.where(packed.valid, v[g, packed.col], fill)
