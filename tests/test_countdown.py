"""Countdown: tokenizer round trip, verifier, solver, split, committed warm start, smoke run."""
from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

from espo_jax.data import countdown, load_tokenizer
from espo_jax.data.countdown_solver import SolverConfig, apply, legal_moves
from espo_jax.rewards.countdown import score_countdown

REPO = pathlib.Path(__file__).resolve().parent.parent
ANS = "2 3 7 8 -> 50"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(countdown.ASSET_DIR)


def test_tokenizer_round_trip(tok):
    ex = countdown.make_examples("train", 20, 0)
    rng = random.Random(0)
    for e in ex:
        trace, _ = countdown.solve(*countdown.parse_prompt(e.prompt), rng)
        for text in (e.prompt, trace):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.unk_token_id not in ids and len(ids) == len(text.split())
            back = tok.batch_decode([ids + [tok.eos_token_id]], skip_special_tokens=True)[0]
            assert back == text
    assert len(tok) <= 128
    assert tok.encode("99 -> 0 ?", add_special_tokens=False) == [
        tok.convert_tokens_to_ids(t) for t in ("99", "->", "0", "?")]


@pytest.mark.parametrize("response,expected", [
    ("8 * 7 = 56 , 56 - 6 = 50 , # ( 8 * 7 ) - ( 3 * 2 )", (1.0, True)),
    ("# 8 * 7 - 3 * 2", (1.0, True)),                      # precedence
    ("# ( 8 * 7 ) - ( 3 * 2 ) = 50", (1.0, True)),         # optional '= target'
    ("# ( 8 * 7 ) - ( 3 + 2 )", (0.0, True)),              # wrong value
    ("# ( 8 * 7 ) - ( 3 * 3 )", (0.0, True)),              # 3 used twice, given once
    ("# 8 * 7 - 9 + 3", (0.0, True)),                      # 9 not given
    ("# ( 7 / 2 ) * 8 + 22", (0.0, True)),                 # non-exact division
    ("# 8 / 0", (0.0, True)),
    ("8 * 7 = 56 , < ?", (0.0, True)),                     # give up: gradable, reward 0
    ("8 * 7 = 56 , 56 - 6 = 50 ,", (0.0, False)),          # no final line
    ("# ( 8 * 7 - ", (0.0, False)),                        # unparseable
    ("# 8 7", (0.0, False)),
    ("", (0.0, False)),
])
def test_verifier(response, expected):
    assert score_countdown(response, ANS) == expected


def test_verifier_rejects_bad_answer():
    with pytest.raises(ValueError, match="countdown answer"):
        score_countdown("# 1", "2 3 50")


def test_solver_arithmetic_and_fail_rate():
    ex = countdown.make_examples("train", 400, 1)
    rng, fails = random.Random(1), 0
    for e in ex:
        nums, target = countdown.parse_prompt(e.prompt)
        trace, solved = countdown.solve(nums, target, rng)
        toks = trace.split()
        for k in range(len(toks) - 4):
            if toks[k + 3] == "=" and toks[k + 1] in "+-*/":
                a, op, b, c = int(toks[k]), toks[k + 1], int(toks[k + 2]), int(toks[k + 4])
                assert apply(a, op, b) == c, trace
        assert len(toks) + 1 <= countdown.MAX_RESPONSE_TOKENS
        assert toks[-1] == "?" if not solved else "#" in toks
        assert score_countdown(trace, e.answer) == (float(solved), True)
        fails += not solved
    assert 0.35 <= fails / len(ex) <= 0.6, fails / len(ex)
    # best-first search (no sampling) with a large budget solves everything it is given
    for e in ex[:50]:
        _, solved = countdown.solve(*countdown.parse_prompt(e.prompt), rng,
                                    SolverConfig(temperature=0.0, budget=10_000, branch=100))
        assert solved, e.prompt


def test_moves():
    assert apply(7, "/", 2) is None and apply(8, "/", 2) == 4 and apply(2, "-", 7) is None
    assert apply(9, "*", 1) is None and apply(50, "*", 2) is None  # 100 > MAX_VALUE
    assert len(legal_moves([3, 3])) == 3  # 3+3, 3*3, 3/3 (3-3=0 is not a legal result)
    assert {op for _, _, op, _ in legal_moves([3, 3])} == {"+", "*", "/"}


def test_split_disjoint_and_deterministic():
    a = countdown.make_examples("train", 300, 0)
    assert a == countdown.make_examples("train", 300, 0)
    assert a != countdown.make_examples("train", 300, 1)
    evals = {e.prompt for s in (0, 1) for e in countdown.make_examples("eval", 1024, s)}
    trains = {e.prompt for s in (0, 1) for e in countdown.make_examples("train", 3000, s)}
    assert not evals & trains
    assert len({e.prompt for e in a}) == 300
    for e in a[:50]:
        nums, target = countdown.parse_prompt(e.prompt)
        assert 3 <= len(nums) <= 4 and all(1 <= n <= 9 for n in nums) and nums == sorted(nums)
        assert 10 <= target <= 60 and e.answer == e.prompt[:-2]
    with pytest.raises(ValueError, match="cannot draw"):
        countdown.make_examples("eval", 10**6, 0)


def test_committed_asset_loads_and_passed_its_gate(tok):
    from espo_jax.models import from_pretrained

    d = countdown.ASSET_DIR
    assert sum(p.stat().st_size for p in d.iterdir()) <= 10 * 2**20
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["eos_token_id"] == tok.eos_token_id and cfg["pad_token_id"] == tok.pad_token_id
    model = from_pretrained(d)
    assert len(tok) <= model.config.vocab_size == cfg["vocab_size"]
    ws = json.loads((d / "warm_start.json").read_text())
    assert ws["gate_passed"] is True and "seed" in ws and "make_countdown_checkpoint" in ws["command"]
    # The recorded figures meet the gate (bounds written here, not read from the asset).
    g = ws["gate"]
    assert g["format_valid"] >= 0.95 and g["arith_correct"] >= 0.98, g
    assert 0.2 <= g["pass1_T1"] <= 0.4 and g["pass16"] >= 0.75, g
    assert g["choice_entropy"] >= 0.6, g


def test_choice_points_follow_the_move_rules():
    sys.path.insert(0, str(REPO / "experiments"))
    from make_countdown_checkpoint import choice_points

    # numbers 2 2 9: first operand 9 or 2 (a choice); after 9, + - * / (a choice), b forced
    # (2); after both backtracks, 2 + 2 is again chosen among {9, 2} and + * /.
    toks = "9 - 2 = 7 , 7 * 2 = 14 , < < 2 + 2 = 4 ,".split()
    pts = choice_points(toks, [2, 2, 9])
    assert 0 in pts and 1 in pts and 2 not in pts           # 9 | op | 2 (only b left)
    assert 6 not in pts and 7 in pts and 8 not in pts       # state {2, 7}: a=7 forced
    assert 14 in pts and 16 not in pts                      # back at {2, 2, 9}
    # a move that breaks the rules ends the replay
    assert choice_points("9 - 5 = 4 , 4 + 2 = 6 ,".split(), [2, 2, 9]) == []


@pytest.mark.slow
def test_smoke_config_runs(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "espo_jax.main", f"--config={REPO / 'configs' / 'countdown.py'}:smoke",
           f"--workdir={tmp_path}", "--config.mesh.fsdp=1", "--config.num_steps=1"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_mean" in r or any(k.startswith("reward") for k in r) for r in rows), rows
