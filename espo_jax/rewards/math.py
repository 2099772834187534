"""Math answer rewards: the last ``\\boxed{}`` of a response, checked with math-verify.

``score_math(response, gold) -> (reward, gradable)``:
  reward 1.0 when the last boxed answer is mathematically equal to ``gold``, else 0.0;
  gradable False when the response has no boxed answer that can be parsed (the trainer
  may then drop or down-weight the sample, see ``compute_advantages(gradable=...)``).

Thread safety: math-verify's timeouts use ``signal.alarm``, which only works in the main
thread. We pass a timeout only when called from the main thread (a worker process of
``score_math_batch`` runs tasks in its main thread, so it is always protected); from other
threads we call math-verify with timeouts disabled, which is safe but unbounded in time,
so prefer ``score_math_batch(..., num_workers=k)`` for untrusted, high-volume scoring.
"""
from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

log = logging.getLogger(__name__)

# Seconds math-verify may spend parsing / comparing one answer (main thread only).
TIMEOUT_S = 5
# Longer boxed contents are not math answers worth a sympy parse (and could be slow).
MAX_ANSWER_CHARS = 1000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")
_THOUSANDS_RE = re.compile(r"(\d)(?:\s|\\[,!;: ]|~|\{,\})+(\d{3})(?!\d)")
_LATEX_CFG = (LatexExtractionConfig(boxed_match_priority=0),)
_GOLD_CFG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or None.

    Also accepts the brace-less shorthand ``\\boxed 5`` (content up to whitespace or ``$``).
    An unclosed final box is skipped in favour of the previous complete one.
    """
    for m in reversed(list(_BOX_RE.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                c = text[j]
                if c == "{" and text[j - 1] != "\\":
                    depth += 1
                elif c == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            continue  # unbalanced: try an earlier box
        shorthand = re.match(r"[^\s$]+", text[i:])
        if shorthand:
            return shorthand.group(0)
    return None


def _clean(answer: str) -> str:
    """Normalise an extracted answer: strip spaces, ``$`` and trailing sentence periods."""
    answer = answer.strip().strip("$").strip()
    while answer.endswith("."):
        answer = answer[:-1].rstrip()
    # Thousands separators written as spaces / thin spaces: "1 000", "1\\,000" -> "1000".
    prev = None
    while prev != answer:
        prev, answer = answer, _THOUSANDS_RE.sub(r"\1\2", answer)
    return answer


def _timeout() -> int | None:
    """math-verify's signal-based timeout only in the main thread; disabled elsewhere."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(latex: str, config) -> list:
    return parse(latex, list(config), parsing_timeout=_timeout())


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str) -> tuple:
    if "\\boxed" in gold or "\\fbox" in gold:
        inner = last_boxed(gold)
        gold = inner if inner is not None else gold
    return tuple(parse("\\boxed{" + _clean(gold) + "}", list(_GOLD_CFG), parsing_timeout=None))


def score_math(response: str, gold: str) -> tuple[float, bool]:
    """Reward of one response against a gold answer (plain string or LaTeX).

    Returns (1.0 | 0.0, gradable). gradable is False when no boxed answer can be
    extracted and parsed from ``response``.
    """
    answer = last_boxed(response)
    if answer is None:
        return 0.0, False
    answer = _clean(answer)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return 0.0, False
    pred = _parse("\\boxed{" + answer + "}", _LATEX_CFG)
    if not pred:
        return 0.0, False
    gold_parsed = list(_parse_gold_cached(str(gold)))
    if not gold_parsed:  # gold math-verify cannot read: fall back to exact string match
        log.warning("score_math: cannot parse gold answer %r; using string match", gold)
        return float(answer.replace(" ", "") == _clean(str(gold)).replace(" ", "")), True
    ok = verify(gold_parsed, pred, timeout_seconds=_timeout())
    return (1.0 if ok else 0.0), True


def _score_pair(pair: tuple[str, str]) -> tuple[float, bool]:
    return score_math(*pair)


_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(num_workers: int) -> ProcessPoolExecutor:
    """A cached pool of spawned workers (fork is unsafe once JAX has started threads)."""
    with _POOLS_LOCK:
        if num_workers not in _POOLS:
            ctx = multiprocessing.get_context("spawn")
            _POOLS[num_workers] = ProcessPoolExecutor(num_workers, mp_context=ctx)
        return _POOLS[num_workers]


@atexit.register
def shutdown_pools() -> None:
    """Stop the worker processes of ``score_math_batch`` (also run at interpreter exit)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.shutdown(wait=False, cancel_futures=True)
        _POOLS.clear()


def score_math_batch(
    responses: Sequence[str], golds: Sequence[str], *, num_workers: int = 0
) -> tuple[list[float], list[bool]]:
    """``score_math`` over B (response, gold) pairs -> (rewards[B], gradable[B]).

    num_workers=0 scores in the calling thread; k > 0 uses a cached pool of k spawned
    processes, each with math-verify's timeouts active (the first call pays the start-up).
    """
    if len(responses) != len(golds):
        raise ValueError(
            f"score_math_batch: {len(responses)} responses but {len(golds)} gold answers"
        )
    pairs = list(zip(map(str, responses), map(str, golds)))
    if num_workers > 0 and pairs:
        chunk = max(1, len(pairs) // (4 * num_workers))
        results = list(_pool(num_workers).map(_score_pair, pairs, chunksize=chunk))
    else:
        results = [score_math(r, g) for r, g in pairs]
    return [r for r, _ in results], [g for _, g in results]
