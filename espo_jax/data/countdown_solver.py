"""A noisy depth-first best-first solver of Countdown that writes its search trace.

At each state (the numbers still available) the solver lists every legal move
(``legal_moves``), orders them by a heuristic (distance of the new number to the target)
plus Gaussian noise, and expands them in that order, depth first: a move is written
``a op b = c ,``; when the new number is the target the trace ends with the answer
``# EXPR`` (the expression that built it); when a state has no move left to try (or only
one number is left) the solver backtracks, writing ``<`` (undo the last expansion on the
current path). At most ``branch`` moves are tried per state, and after ``budget``
expansions the solver gives up with ``?``. The arithmetic it writes is always right; the
noise makes it miss solutions, so a fraction of its traces end in ``?`` (tuned in
experiments/make_countdown_checkpoint.py) and its choices are stochastic.

Move rules (shared with the problem generator, ``espo_jax.data.countdown``): the larger
operand first; ``a + b``, ``a - b`` (a > b), ``a * b`` (a, b > 1) and ``a / b`` (b > 1,
exact); the result must be in 1..MAX_VALUE (99) so every number is one token.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random

MAX_VALUE = 99
OPS = ("+", "-", "*", "/")


def apply(a: int, op: str, b: int) -> int | None:
    """a op b under the move rules (a >= b), or None when the move is not legal."""
    if a < b:
        return None
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b if a > b else None
    elif op == "*":
        c = a * b if b > 1 else None
    elif op == "/":
        c = a // b if b > 1 and a % b == 0 else None
    else:
        raise ValueError(f"unknown operator {op!r}")
    return c if c is not None and 1 <= c <= MAX_VALUE else None


def legal_moves(values) -> list[tuple[int, int, str, int]]:
    """[(i, j, op, c)]: the legal moves on ``values`` (values[i] >= values[j]), one per
    distinct (a, op, b) so repeated numbers do not repeat moves."""
    seen, out = set(), []
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j or values[i] < values[j] or (values[i] == values[j] and i > j):
                continue
            for op in OPS:
                c = apply(values[i], op, values[j])
                key = (values[i], op, values[j])
                if c is None or key in seen:
                    continue
                seen.add(key)
                out.append((i, j, op, c))
    return out


@functools.lru_cache(maxsize=None)
def reach_counts(values: tuple[int, ...]) -> dict[int, int]:
    """{value: number of distinct move sequences from ``values`` (a sorted tuple) whose last
    move makes that value}: a problem's number of solutions is ``reach_counts(nums)[target]``."""
    total: dict[int, int] = {}
    for i, j, _, c in legal_moves(values):
        total[c] = total.get(c, 0) + 1
        if len(values) > 2:
            rest = tuple(sorted([v for k, v in enumerate(values) if k not in (i, j)] + [c]))
            for v, n in reach_counts(rest).items():
                total[v] = total.get(v, 0) + n
    return total


def count_solutions(values, target: int) -> int:
    """Distinct move sequences from ``values`` whose last move makes ``target``."""
    return reach_counts(tuple(sorted(values))).get(target, 0)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    noise: float = 0.5     # std of the Gaussian added to the heuristic (in log-distance units)
    budget: int = 8        # expansions before giving up
    branch: int = 3        # moves tried per state


class _Done(Exception):
    pass


def _wrap(expr: str, leaf: bool) -> str:
    return expr if leaf else f"( {expr} )"


def solve(numbers: list[int], target: int, rng: random.Random,
          cfg: SolverConfig = SolverConfig()) -> tuple[str, bool]:
    """(trace text, solved) for one problem; the trace is space-separated tokens."""
    out: list[str] = []
    used = [0]

    def dfs(state):  # state: list of (value, expr, is_leaf)
        values = [v for v, _, _ in state]
        moves = legal_moves(values)
        scored = [(math.log1p(abs(m[3] - target)) + cfg.noise * rng.gauss(0.0, 1.0), m)
                  for m in moves]
        scored.sort(key=lambda x: x[0])
        for _, (i, j, op, c) in scored[: cfg.branch]:
            if used[0] >= cfg.budget:
                out.append("?")
                raise _Done(False)
            used[0] += 1
            (a, ea, la), (b, eb, lb) = state[i], state[j]
            out.extend([str(a), op, str(b), "=", str(c), ","])
            expr = f"{_wrap(ea, la)} {op} {_wrap(eb, lb)}"
            if c == target:
                out.extend(["#", expr])
                raise _Done(True)
            rest = [s for k, s in enumerate(state) if k not in (i, j)] + [(c, expr, False)]
            if len(rest) > 1:
                dfs(rest)
            out.append("<")

    try:
        dfs([(v, str(v), True) for v in numbers])
        out.append("?")  # the tree (as pruned by ``branch``) is exhausted
        solved = False
    except _Done as d:
        solved = bool(d.args[0])
    return " ".join(out), solved
