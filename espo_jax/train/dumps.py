"""Rollout dumps: what a step sampled, how ESPO grouped it, and how far the update moved it.

A dump is two files with a common stem (the runner writes ``workdir/dumps/step_%06d``):

``<stem>.npz`` (numpy, compressed). B = responses (prompts x G), T = response tokens.
  response_tokens  int32[B, T]    sampled token ids (padding after EOS)
  mask             float32[B, T]  1 = a generated token up to and including EOS
  entropy          float32[B, T]  old-policy token entropy (nats, at the sampling temperature)
  group_ids        int32[B, T]    ESPO entropy group (0 = highest entropy), -1 where masked;
                                  ``espo_jax.objectives.entropy_groups`` with the run's grouping
  ratios           float32[B, T]  exp(logp - old_logp) at the last update: logp from the
                                  last minibatch pass that contained the row; 1 where masked
  rewards          float32[B]     shaped reward used for the advantages
  optional: old_logp f32[B, T], advantages f32[B], correct f32[B], gradable bool[B],
            prompt_index int[B] (index into the train split; G consecutive rows share it),
            prompt_tokens i32[B, P], prompt_mask i32[B, P]
  step             int64[]        the RL step (1-based) whose rollout this is
  meta_json        str[]          JSON: objective, grouping, top_fraction, num_groups,
                                  entropy_edges, alpha, clip_mode, clip_low, clip_high,
                                  vocab_size, temperature, group_size
``<stem>.jsonl``: one JSON object per row, in row order:
  {"row", "prompt_index", "prompt", "answer", "response", "reward",
   "tokens": [decoded string of each valid response token]}

``load_dump`` also reads the runner's earlier format (npz keys ``tokens``/``group_index``,
no ``group_ids``/``meta_json``; jsonl ``group`` = prompt index, no ``tokens``): it renames the
keys, recomputes the group ids from the entropies with the grouping in the workdir's
config.json (ESPO defaults otherwise) and decodes token strings when given a tokenizer.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import pathlib
from typing import Any, Sequence

import numpy as np
from etils import epath

REQUIRED = ("response_tokens", "mask", "entropy", "group_ids", "ratios", "rewards")
_RENAMES = {"tokens": "response_tokens", "group_index": "prompt_index"}
GROUPING_KEYS = ("grouping", "top_fraction", "num_groups", "entropy_edges")
ESPO_DEFAULTS = dict(objective="espo", grouping="top_fraction", top_fraction=0.2, num_groups=2,
                     entropy_edges=None, alpha=0.02, clip_mode="adaptive", clip_low=3e-4,
                     clip_high=4e-4)


@dataclasses.dataclass
class Dump:
    """A loaded rollout dump: ``arrays`` (names above), ``rows`` (jsonl records), ``meta``."""
    step: int
    arrays: dict[str, np.ndarray]
    rows: list[dict]
    meta: dict[str, Any]

    def __getattr__(self, name):  # d.entropy, d.group_ids, ... (arrays by name)
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(f"Dump has no array {name!r}; arrays: {sorted(arrays)}")

    @property
    def num_rows(self) -> int:
        return int(self.arrays["mask"].shape[0])

    def tokens(self, row: int) -> list[str]:
        """Decoded strings of the valid response tokens of ``row`` ('' when unknown)."""
        n = int(self.arrays["mask"][row].sum())
        toks = self.rows[row].get("tokens") if row < len(self.rows) else None
        return list(toks) if toks is not None else [""] * n


def _stem(path) -> epath.Path:
    p = epath.Path(path)
    return p.with_suffix("") if p.suffix in (".npz", ".jsonl") else p


def write_dump(path, *, step: int, prompts: Sequence[str], response_tokens, response_text:
               Sequence[str], entropy, group_ids, ratios, rewards, mask, answers=None,
               token_strings: Sequence[Sequence[str]] | None = None, meta: dict | None = None,
               **extra_arrays) -> epath.Path:
    """Write ``<path>.npz`` + ``<path>.jsonl`` (see the module docstring); returns the stem.

    prompts / response_text / answers: one string per row (B). token_strings: per row, the
    decoded valid tokens. extra_arrays: any of the optional arrays (old_logp, advantages,
    correct, gradable, prompt_index, prompt_tokens, prompt_mask).
    """
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(response_tokens=np.asarray(response_tokens, np.int32),
                  mask=np.asarray(mask, np.float32), entropy=np.asarray(entropy, np.float32),
                  group_ids=np.asarray(group_ids, np.int32),
                  ratios=np.asarray(ratios, np.float32), rewards=np.asarray(rewards, np.float32))
    B, T = arrays["mask"].shape
    for k in ("response_tokens", "entropy", "group_ids", "ratios"):
        if arrays[k].shape != (B, T):
            raise ValueError(f"write_dump: {k} has shape {arrays[k].shape}, expected [B, T] = "
                             f"{(B, T)} like mask")
    if arrays["rewards"].shape != (B,):
        raise ValueError(f"write_dump: rewards has shape {arrays['rewards'].shape}, expected [{B}]")
    for name, seq in (("prompts", prompts), ("response_text", response_text)):
        if len(seq) != B:
            raise ValueError(f"write_dump: {name} has {len(seq)} entries, expected B={B}")
    for k, v in extra_arrays.items():
        if v is not None:
            arrays[k] = np.asarray(v)
    with stem.with_suffix(".npz").open("wb") as fh:  # epath: a local or gs:// workdir
        np.savez_compressed(fh, step=np.int64(step),
                            meta_json=np.asarray(json.dumps(meta or {}, default=_json_default)),
                            **arrays)
    pidx = arrays.get("prompt_index")
    with stem.with_suffix(".jsonl").open("w") as f:
        for i in range(B):
            rec = {"row": i, "prompt_index": None if pidx is None else int(pidx[i]),
                   "prompt": prompts[i], "answer": None if answers is None else answers[i],
                   "response": response_text[i], "reward": float(arrays["rewards"][i])}
            if token_strings is not None:
                rec["tokens"] = list(token_strings[i])
            f.write(json.dumps(rec) + "\n")
    return stem


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (tuple, np.ndarray)):
        return list(np.asarray(o).tolist())
    return str(o)


def token_strings(tokenizer, tokens, mask) -> list[list[str]]:
    """Per row, each valid token decoded on its own (for colouring; may split characters)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return [[tokenizer.decode([int(t)]) for t in tokens[i][mask[i] > 0]] for i in range(len(mask))]


def meta_from_config(config, vocab_size: int | None = None) -> dict:
    """The grouping / clipping settings of a run (ESPO's block, whatever objective ran)."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    obj = c.get("objective", {})
    espo = dict(obj.get("espo", {}))
    meta = {**ESPO_DEFAULTS, **{k: espo[k] for k in ESPO_DEFAULTS if k in espo}}
    meta["objective"] = obj.get("name", "espo")
    meta["vocab_size"] = vocab_size
    meta["temperature"] = c.get("rollout", {}).get("temperature")
    meta["group_size"] = c.get("rollout", {}).get("group_size")
    return meta


def compute_group_ids(entropy, mask, meta: dict) -> np.ndarray:
    """int32[B, T] entropy groups with the grouping in ``meta`` (-1 masked)."""
    from espo_jax.objectives import entropy_groups  # noqa: PLC0415 (jax only when needed)

    mode = meta.get("grouping") or "top_fraction"
    params = {}
    if mode == "top_fraction":
        params["top_fraction"] = float(meta.get("top_fraction") or 0.2)
    elif mode == "quantile":
        params["num_groups"] = int(meta.get("num_groups") or 2)
    elif mode == "ranges":
        params["entropy_edges"] = tuple(meta["entropy_edges"])
    return np.asarray(entropy_groups(np.asarray(entropy, np.float32),
                                     np.asarray(mask) > 0, mode, **params), np.int32)


def write_runner_dump(path, *, step: int, scored, ratios, task, tokenizer, config,
                      vocab_size: int | None = None) -> epath.Path:
    """Write a dump of one runner step: ``scored`` (``batches.ScoredBatch``: the rollout,
    old log-probs, entropy, advantages) and ``ratios`` f32[B,N] (pi_theta / pi_old of each
    token at its last update). Computes the entropy group ids."""
    meta = meta_from_config(config, vocab_size)
    meta["step"] = int(step)
    ro = scored.rollout
    mask = np.asarray(ro.mask, np.float32)
    examples = [task.train[int(i)] for i in ro.group_index]
    return write_dump(
        path, step=step, prompts=[e.prompt for e in examples],
        answers=[e.answer for e in examples], response_tokens=ro.tokens,
        response_text=list(ro.texts), entropy=scored.entropy,
        group_ids=compute_group_ids(scored.entropy, mask, meta), ratios=ratios,
        rewards=ro.rewards, mask=mask,
        token_strings=token_strings(tokenizer, ro.tokens, mask), meta=meta,
        old_logp=scored.old_logp, advantages=scored.advantages, correct=ro.correct,
        gradable=ro.gradable, prompt_index=ro.group_index, prompt_tokens=ro.prompt_tokens,
        prompt_mask=ro.prompt_mask)


def _meta_from_workdir(stem: epath.Path) -> dict:
    """Grouping + vocab from ``<workdir>/config.json`` for a runner dump in workdir/dumps/."""
    cfg = stem.parent.parent / "config.json"
    if not cfg.is_file():
        return dict(ESPO_DEFAULTS)
    meta = meta_from_config(json.loads(cfg.read_text()))
    model_cfg = pathlib.Path(json.loads(cfg.read_text()).get("model", {}).get("path", "")) / \
        "config.json"
    if model_cfg.is_file():
        meta["vocab_size"] = json.loads(model_cfg.read_text()).get("vocab_size")
    return meta


def load_dump(path, *, tokenizer=None) -> Dump:
    """Load ``<stem>.npz`` + ``<stem>.jsonl`` (path: the stem or either file)."""
    stem = _stem(path)
    npz_path = stem.with_suffix(".npz")
    if not npz_path.is_file():
        raise FileNotFoundError(f"load_dump: {npz_path} does not exist (expected a dump stem "
                                "like workdir/dumps/step_000010)")
    with npz_path.open("rb") as fh, np.load(io.BytesIO(fh.read()), allow_pickle=False) as z:
        arrays = {_RENAMES.get(k, k): z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta_json"))) if "meta_json" in arrays else \
        _meta_from_workdir(stem)
    step = int(arrays.pop("step")) if "step" in arrays else int(
        "".join(ch for ch in stem.name if ch.isdigit()) or 0)
    if "group_ids" not in arrays and "entropy" in arrays and "mask" in arrays:
        arrays["group_ids"] = compute_group_ids(arrays["entropy"], arrays["mask"], meta)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"load_dump: {npz_path} lacks arrays {missing}; has {sorted(arrays)}")
    rows = []
    jl = stem.with_suffix(".jsonl")
    if jl.is_file():
        for n, line in enumerate(jl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"load_dump: {jl} line {n} is not JSON: {e}") from e
                if "prompt_index" not in rec and "group" in rec:
                    rec["prompt_index"] = rec.pop("group")
                rows.append(rec)
    if tokenizer is not None and rows and "tokens" not in rows[0]:
        for rec, toks in zip(rows, token_strings(tokenizer, arrays["response_tokens"],
                                                 arrays["mask"])):
            rec["tokens"] = toks
    return Dump(step=step, arrays=arrays, rows=rows, meta=meta)


def find_dumps(workdir) -> list[epath.Path]:
    """Dump stems under ``workdir/dumps`` (or ``workdir`` itself), by step."""
    d = epath.Path(workdir)
    d = d / "dumps" if (d / "dumps").is_dir() else d
    return sorted(p.with_suffix("") for p in d.glob("*.npz"))


# ------------------------------------------------------------------ analysis helpers --
def group_table(d: Dump, *, alpha: float | None = None, vocab_size: int | None = None) -> dict:
    """Per (row, non-empty group) statistics as flat numpy columns (numpy only).

    Returns dict of arrays [N]: row, group, size, entropy_mean, eps (alpha * entropy_mean /
    ln V, ESPO's adaptive range), log_ratio_mean, group_ratio = exp(log_ratio_mean) (ESPO's
    s_tau at the last update), advantage (if dumped), clipped (the group's ratio left
    [1 - eps, 1 + eps] on the side its advantage's sign makes the clip active).
    """
    alpha = float(alpha if alpha is not None else d.meta.get("alpha") or 0.02)
    V = vocab_size or d.meta.get("vocab_size")
    g, m = d.group_ids, d.mask > 0
    ent = d.entropy.astype(np.float64)
    logr = np.log(np.clip(d.ratios.astype(np.float64), 1e-30, None))
    adv = d.arrays.get("advantages")
    cols = {k: [] for k in ("row", "group", "size", "entropy_mean", "log_ratio_mean", "advantage")}
    for b in range(g.shape[0]):
        for k in np.unique(g[b][m[b]]):
            sel = m[b] & (g[b] == k)
            cols["row"].append(b)
            cols["group"].append(int(k))
            cols["size"].append(int(sel.sum()))
            cols["entropy_mean"].append(float(ent[b][sel].mean()))
            cols["log_ratio_mean"].append(float(logr[b][sel].mean()))
            cols["advantage"].append(float(adv[b]) if adv is not None else math.nan)
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["eps"] = (alpha * out["entropy_mean"] / math.log(V) if V else
                  np.full_like(out["entropy_mean"], math.nan))
    out["group_ratio"] = np.exp(out["log_ratio_mean"])
    a, s, e = out["advantage"], out["group_ratio"], out["eps"]
    out["clipped"] = ((a > 0) & (s > 1 + e)) | ((a < 0) & (s < 1 - e))
    return out


def save_dump(d: Dump, path, *, rows: Sequence[int] | None = None) -> epath.Path:
    """Re-write a loaded dump (optionally only ``rows``) in the current format, e.g. to
    upgrade an old runner dump or cut a small sample for tests."""
    idx = np.arange(d.num_rows) if rows is None else np.asarray(rows, int)
    a = {k: v[idx] if v.ndim and v.shape[0] == d.num_rows else v for k, v in d.arrays.items()}
    recs = [d.rows[i] if i < len(d.rows) else {} for i in idx]
    core = {k: a.pop(k) for k in REQUIRED}
    return write_dump(path, step=d.step, prompts=[r.get("prompt", "") for r in recs],
                      answers=[r.get("answer") for r in recs],
                      response_text=[r.get("response", "") for r in recs],
                      token_strings=[d.tokens(int(i)) for i in idx], meta=d.meta, **core, **a)
