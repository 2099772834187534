"""Verifier of the Countdown task (format: see ``espo_jax.data.countdown``).

Only the final line is scored: the expression after the first ``#`` of the response (the
search trace before it is not checked). Reward 1.0 iff that expression

* parses (numbers, ``+ - * /`` and parentheses; usual precedence, left associative),
* uses each given number at most as often as it is given (multiset inclusion), and
* evaluates exactly to the target, every division being exact in the integers (an
  expression whose value is right only through a fractional intermediate scores 0).

``gradable`` is False when the response has neither a parseable ``# EXPR`` nor the
give-up marker ``?``; a give-up (``?`` before any ``#``) is a valid, gradable answer with
reward 0, so RL can weigh giving up against a wrong answer. No ``eval()``: a small
recursive-descent parser over a token list.
"""
from __future__ import annotations

import re
from collections import Counter

ANSWER_MARK = "#"
GIVE_UP_MARK = "?"
_TOKEN_RE = re.compile(r"\d+|->|[-+*/=(),<#?:]|\S")
_MAX_DIGITS = 6  # bounds the work a pathological response can cause


def tokenize(text: str) -> list[str]:
    """Tokens of a trace or expression: integers, operators, parentheses, markers."""
    return _TOKEN_RE.findall(text)


def parse_answer(answer: str) -> tuple[list[int], int]:
    """(numbers, target) of an answer string ``"2 3 7 8 -> 46"``; ValueError otherwise."""
    toks = tokenize(answer)
    if "->" not in toks:
        raise ValueError(f"not a countdown answer (expected '<n> <n> ... -> <target>'): {answer!r}")
    i = toks.index("->")
    nums, rest = toks[:i], toks[i + 1:]
    if not nums or len(rest) != 1 or not all(t.isdigit() for t in nums + rest):
        raise ValueError(f"not a countdown answer (expected '<n> <n> ... -> <target>'): {answer!r}")
    return [int(t) for t in nums], int(rest[0])


class _Parser:
    """expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ;
    atom := INT | '(' expr ')'. Values are ints; a non-exact division raises."""

    def __init__(self, toks: list[str]):
        self.toks, self.i, self.numbers = toks, 0, []

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def expr(self) -> int:
        v = self.term()
        while self.peek() in ("+", "-"):
            op, w = self.take(), self.term()
            v = v + w if op == "+" else v - w
        return v

    def term(self) -> int:
        v = self.atom()
        while self.peek() in ("*", "/"):
            op, w = self.take(), self.atom()
            if op == "*":
                v = v * w
            else:
                if w == 0 or v % w:
                    raise ArithmeticError("non-exact division")
                v = v // w
        return v

    def atom(self) -> int:
        t = self.take()
        if t == "(":
            v = self.expr()
            if self.take() != ")":
                raise ValueError("unbalanced parentheses")
            return v
        if t is not None and t.isdigit() and len(t) <= _MAX_DIGITS:
            self.numbers.append(int(t))
            return int(t)
        raise ValueError(f"unexpected token {t!r}")


def evaluate(expr_tokens: list[str]) -> tuple[int, list[int]]:
    """(value, numbers used) of an expression's tokens. ValueError when it does not parse,
    ArithmeticError on a non-exact division or division by zero."""
    p = _Parser(expr_tokens)
    v = p.expr()
    if p.peek() is not None:
        raise ValueError(f"trailing token {p.peek()!r}")
    return v, p.numbers


def final_expression(response: str) -> list[str] | None:
    """Tokens after the first ``#`` up to the end (an optional ``= <int>`` dropped), or None
    when there is no ``#`` or a give-up marker comes first."""
    toks = tokenize(response)
    for i, t in enumerate(toks):
        if t == GIVE_UP_MARK:
            return None
        if t == ANSWER_MARK:
            expr = toks[i + 1:]
            if len(expr) >= 2 and expr[-2] == "=":
                expr = expr[:-2]
            return expr
    return None


def gave_up(response: str) -> bool:
    """True when the give-up marker comes before any answer marker."""
    for t in tokenize(response):
        if t in (GIVE_UP_MARK, ANSWER_MARK):
            return t == GIVE_UP_MARK
    return False


def score_countdown(response: str, answer: str) -> tuple[float, bool]:
    """(reward, gradable) of a response against ``answer`` = ``"<numbers> -> <target>"``."""
    numbers, target = parse_answer(answer)
    if gave_up(response):
        return 0.0, True
    expr = final_expression(response)
    if expr is None:
        return 0.0, False
    try:
        value, used = evaluate(expr)
    except ValueError:
        return 0.0, False
    except ArithmeticError:
        return 0.0, True
    if Counter(used) - Counter(numbers):  # some number used more often than given
        return 0.0, True
    return (1.0 if value == target else 0.0), True
