"""The embedded task: generator determinism, split disjointness, verifier, committed policy."""
import json

import pytest

from espo_jax.data import arith, check_disjoint, load_tokenizer


@pytest.fixture(scope="module")
def splits():
    return arith.make_examples("train", 3000, seed=0), arith.make_examples("eval", 500, seed=0)


def test_deterministic_and_distinct(splits):
    train, evals = splits
    assert arith.make_examples("train", 3000, seed=0) == train
    assert arith.make_examples("train", 50, seed=1) != train[:50]
    assert len({e.prompt for e in train}) == len(train)
    assert len({e.id for e in train + evals}) == len(train) + len(evals)


def test_split_disjoint(splits):
    train, evals = splits
    check_disjoint(train, evals)
    other = arith.make_examples("train", 3000, seed=7)  # any seed: still disjoint from eval
    check_disjoint(other, evals)
    assert all(arith.split_of(e.prompt[2:-1]) == "eval" for e in evals)
    assert all(arith.split_of(e.prompt[2:-1]) == "train" for e in train)


def test_problem_shape(splits):
    train, evals = splits
    for ex in train + evals:
        nums, ops = arith.parse_prompt(ex.prompt)
        assert 2 <= len(nums) <= 4 and all(1 <= n <= arith.MAX_OPERAND for n in nums)
        assert 0 <= int(ex.answer) <= arith.MAX_VALUE
    assert {len(arith.parse_prompt(e.prompt)[0]) for e in evals} == {2, 3, 4}


def test_reference_scratchpad_verifies(splits):
    train, evals = splits
    for ex in train + evals:
        ref = arith.reference_response(ex.prompt)
        assert arith.verify(ref, ex.answer) == (1.0, True)
        assert arith.verify(arith.direct_response(ex.prompt), ex.answer) == (1.0, True)
        # every step is true arithmetic
        for step in ref.split(";")[:-1]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307 (digits and +/- only)
    assert arith.reference_response("Q:37+48-19=") == "37+48=85;85-19=66;#66"
    assert arith.direct_response("Q:37+48-19=") == "#66"
    assert arith.verify("37+48=85;85-19=66;#65", "66") == (0.0, True)
    assert arith.verify("37+48=85;", "66") == (0.0, False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        arith.make_examples("test", 1, 0)
    with pytest.raises(ValueError, match="not an arith prompt"):
        arith.parse_prompt("Q:1*2=")
    with pytest.raises(ValueError, match="cannot draw"):
        arith.make_examples("eval", 100, 0, max_operands=2, max_operand=3)


def test_committed_checkpoint_matches_tokenizer():
    from espo_jax.models import from_pretrained

    files = {p.name for p in arith.ASSET_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sum(p.stat().st_size for p in arith.ASSET_DIR.iterdir()) <= 10 * 2**20
    tok = load_tokenizer(arith.ASSET_DIR)
    cfg = json.loads((arith.ASSET_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["eos_token_id"] == tok.eos_token_id and cfg["pad_token_id"] == tok.pad_token_id
    model = from_pretrained(arith.ASSET_DIR)
    assert len(tok) <= model.config.vocab_size == cfg["vocab_size"]
    emb = model.unembedding()
    assert emb.shape == (cfg["hidden_size"], cfg["vocab_size"])
