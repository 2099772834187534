"""jsonl loading errors, tokenizer loading and checks, split-overlap check."""
import json

import pytest
import transformers

from espo_jax.data import (
    Example, arith, check_disjoint, check_vocab, ensure_pad_token, load_jsonl, load_tokenizer,
    rows_to_examples)
from espo_jax.data.char_tokenizer import build_char_tokenizer, save_char_tokenizer


def _write(path, text):
    path.write_text(text)
    return path


def test_load_jsonl_ok(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"problem": "1+1", "answer": "2", "id": "a"}\n\n'
               '{"problem": "2+2", "answer": "4"}\n')
    rows = load_jsonl(p)
    assert [r["answer"] for r in rows] == ["2", "4"]
    exs = rows_to_examples(rows)
    assert exs == [Example("1+1", "2", "a"), Example("2+2", "4", "row-1")]


def test_load_jsonl_malformed_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"problem": "1", "answer": "1"}\n{"problem": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_jsonl(p)


def test_load_jsonl_missing_field(tmp_path):
    p = _write(tmp_path / "m.jsonl", '{"problem": "1", "answer": "1"}\n{"problem": "2"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: missing field\(s\) \['answer'\]"):
        load_jsonl(p)
    p2 = _write(tmp_path / "l.jsonl", "[1, 2]\n")
    with pytest.raises(ValueError, match=r"l\.jsonl:1: expected a JSON object"):
        load_jsonl(p2)


def test_load_jsonl_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        load_jsonl(_write(tmp_path / "e.jsonl", "\n  \n"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has none of"):
        load_tokenizer(tmp_path / "empty")


def _hf_tokenizer(tmp_path, pad, eos, extra=()):
    """A tiny fast tokenizer whose pad/eos we control."""
    d = tmp_path / "tok"
    save_char_tokenizer(build_char_tokenizer("abc"), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(pad_token=pad, eos_token=eos)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").unlink()
    return d


def test_pad_equal_to_eos_is_replaced(tmp_path):
    d = _hf_tokenizer(tmp_path, pad="<eos>", eos="<eos>")
    raw = transformers.AutoTokenizer.from_pretrained(str(d))
    assert raw.pad_token_id == raw.eos_token_id
    tok = load_tokenizer(d)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


def test_pad_impossible_raises():
    class Tok:  # eos-aliased pad, no candidate in the vocabulary
        name_or_path, eos_token, eos_token_id, pad_token, pad_token_id = "t", "e", 1, "e", 1

        def get_vocab(self):
            return {"e": 1, "a": 0}

    with pytest.raises(ValueError, match="equal to eos"):
        ensure_pad_token(Tok())


def test_arith_tokenizer_from_asset_dir():
    tok = load_tokenizer(arith.ASSET_DIR)
    assert tok.pad_token_id != tok.eos_token_id
    text = "Q:37+48-19=37+48=85;85-19=66;#66"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert tok.unk_token_id not in ids


def test_check_vocab():
    tok = load_tokenizer(arith.ASSET_DIR)
    check_vocab(tok, len(tok))
    with pytest.raises(ValueError, match="vocab mismatch"):
        check_vocab(tok, len(tok) - 1)


def test_check_disjoint():
    check_disjoint(["a", "b"], [{"problem": "c"}])
    with pytest.raises(ValueError, match="eval split overlaps train: 1 of 2"):
        check_disjoint([Example("x  y", "1", "0")], [Example("x y", "1", "1"), "z"])
