"""Rollout dumps (espo_jax.train.dumps) and notebooks/entropy_groups.ipynb executed on the
small saved dump in tests/data/dump_small (outputs must be stripped in git)."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from espo_jax.train import dumps

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "entropy_groups.ipynb"
DUMP_DIR = REPO / "tests" / "data" / "dump_small"


def _arrays(B=4, T=6, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < np.array([6, 4, 5, 1])[:B, None]).astype(np.float32)
    ent = rng.uniform(0, 3, (B, T)).astype(np.float32)
    return dict(response_tokens=rng.integers(3, 50, (B, T)), mask=mask, entropy=ent,
                ratios=np.exp(rng.normal(0, 0.01, (B, T))) * mask + (1 - mask),
                rewards=np.array([1, 0, 1, 0], np.float32)[:B])


def test_write_load_roundtrip_and_groups(tmp_path):
    a = _arrays()
    meta = dict(dumps.ESPO_DEFAULTS, vocab_size=64)
    gids = dumps.compute_group_ids(a["entropy"], a["mask"], meta)
    assert gids.dtype == np.int32 and (gids[a["mask"] == 0] == -1).all()
    # top-20%: ceil(0.2 * L) tokens in group 0 -> L=6: 2, L=4: 1, L=5: 1, L=1: 1
    assert list((gids == 0).sum(1)) == [2, 1, 1, 1]
    row0 = a["entropy"][0]
    assert set(np.argsort(-row0)[:2]) == set(np.nonzero(gids[0] == 0)[0])
    stem = dumps.write_dump(tmp_path / "dumps" / "step_000003", step=3,
                            prompts=["p"] * 4, answers=["1"] * 4, response_text=["r"] * 4,
                            group_ids=gids, meta=meta, advantages=np.array([1., -1., 1., -1.]),
                            token_strings=[["x"] * int(n) for n in a["mask"].sum(1)], **a)
    d = dumps.load_dump(stem.with_suffix(".npz"))
    assert d.step == 3 and d.meta["vocab_size"] == 64 and d.num_rows == 4
    np.testing.assert_array_equal(d.group_ids, gids)
    np.testing.assert_allclose(d.entropy, a["entropy"])
    assert d.rows[1]["tokens"] == ["x"] * 4 and d.tokens(3) == ["x"]
    assert dumps.find_dumps(tmp_path) == [stem]
    tab = dumps.group_table(d)
    assert tab["size"].sum() == a["mask"].sum()
    expect = 0.02 * tab["entropy_mean"] / np.log(64)
    np.testing.assert_allclose(tab["eps"], expect)
    small = dumps.save_dump(d, tmp_path / "small" / "step_000003", rows=[1, 3])
    e = dumps.load_dump(small)
    np.testing.assert_array_equal(e.group_ids, gids[[1, 3]])
    assert e.rows[1]["tokens"] == ["x"]
    with pytest.raises(ValueError, match="entropy has shape"):
        dumps.write_dump(tmp_path / "bad", step=1, prompts=["p"] * 4, response_text=["r"] * 4,
                         group_ids=gids, **{**a, "entropy": a["entropy"][:, :3]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dumps.load_dump(tmp_path / "nope")


def test_load_runner_format_recomputes_groups(tmp_path):
    """The runner's earlier dumps (tokens/group_index, no group_ids) still load."""
    a = _arrays()
    wd = tmp_path / "wd"
    (wd / "dumps").mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps(
        {"objective": {"name": "espo", "espo": {"grouping": "top_fraction", "top_fraction": 0.5,
                                                 "alpha": 0.05}}}))
    np.savez_compressed(wd / "dumps" / "step_000004.npz", tokens=a["response_tokens"],
                        mask=a["mask"], entropy=a["entropy"], ratios=a["ratios"],
                        rewards=a["rewards"], group_index=np.array([0, 0, 1, 1]))
    (wd / "dumps" / "step_000004.jsonl").write_text("".join(
        json.dumps({"row": i, "group": i // 2, "prompt": "p", "response": "r", "reward": 0.0})
        + "\n" for i in range(4)))
    d = dumps.load_dump(dumps.find_dumps(wd)[0])
    assert d.step == 4 and d.meta["alpha"] == 0.05 and d.meta["top_fraction"] == 0.5
    assert list((d.group_ids == 0).sum(1)) == [3, 2, 3, 1]
    assert d.rows[2]["prompt_index"] == 1 and "prompt_index" in d.arrays


def test_notebook_outputs_stripped():
    nb = json.loads(NOTEBOOK.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                f"{NOTEBOOK.name} cell {i} has outputs: strip them before committing"


def test_small_dump_is_small_and_complete():
    stems = dumps.find_dumps(DUMP_DIR)
    assert len(stems) == 1
    assert sum(p.stat().st_size for p in DUMP_DIR.iterdir()) < 200_000
    d = dumps.load_dump(stems[0])
    assert d.meta.get("vocab_size") and "advantages" in d.arrays
    assert all("tokens" in r for r in d.rows)


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
    """Run every cell with nbclient on a kernel of THIS interpreter (the venv's python)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    spec = tmp_path / "kernels" / "espo-venv"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "espo-jax venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("ESPO_DUMP", str(DUMP_DIR))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="espo-venv", timeout=120,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(images) >= 4, "expected the entropy, epsilon, ratio and position plots"
    assert html and html[0].count("<span") >= 4, "expected responses coloured by group"
    text = "".join(o.get("text", "") for o in outputs)
    assert "clip fraction" in text and "eps" in text
