"""A noisy depth-first best-first solver of Countdown that writes its search trace.

At each state (the numbers still available) the solver lists every legal move
(``legal_moves``) and draws them in a random order without replacement, each next move with
probability proportional to ``exp(-h / temperature)`` over the moves not yet tried. The
heuristic ``h`` is the log-distance of the move's result to the target, minus
``reach_bonus`` when the target is still reachable from the resulting numbers: a sharp
heuristic would make every demonstration alike (no entropy left for RL at the choice tokens),
a flat one would rarely solve anything; the temperature trades the two. Moves are expanded
depth first: a move is written ``a op b = c ,``; when the new number is the target the trace
ends with the answer ``# EXPR`` (the expression that built it); when a state has no move
left to try (or only one number is left) the solver backtracks, writing ``<`` (undo the last
expansion on the current path). At most ``branch`` moves are tried per state, and after
``budget`` expansions the solver gives up with ``?``. The arithmetic it writes is always
right; its choices are stochastic, so a fraction of its traces end in ``?`` (tuned in
experiments/make_countdown_checkpoint.py).

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
    temperature: float = 3.0  # of the move distribution (0: always the best move first)
    reach_bonus: float = 5.0  # heuristic bonus of a move after which the target is reachable
    budget: int = 10       # expansions before giving up
    branch: int = 3        # moves tried per state


def _heuristic(values, move, target: int, reach_bonus: float) -> float:
    """Lower is better: log-distance of the move's result to the target, minus reach_bonus
    when the target is still reachable from the numbers the move leaves."""
    i, j, _, c = move
    rest = tuple(sorted([v for k, v in enumerate(values) if k not in (i, j)] + [c]))
    reachable = c == target or (len(rest) > 1 and reach_counts(rest).get(target, 0) > 0)
    return math.log1p(abs(c - target)) - reach_bonus * reachable


def _draw_order(moves, h, temperature: float, rng: random.Random):
    """``moves`` in a random order: each next one drawn without replacement with probability
    proportional to exp(-h / temperature) (temperature 0: ascending h)."""
    if temperature <= 0:
        return [m for _, m in sorted(zip(h, moves), key=lambda x: x[0])]
    # Gumbel-top-k: sorting by -h/T + Gumbel noise is sequential sampling without replacement.
    keys = [-x / temperature - math.log(-math.log(rng.random() or 1e-300)) for x in h]
    return [m for _, m in sorted(zip(keys, moves), key=lambda x: -x[0])]


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
        h = [_heuristic(values, m, target, cfg.reach_bonus) for m in moves]
        for i, j, op, c in _draw_order(moves, h, cfg.temperature, rng)[: cfg.branch]:
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
