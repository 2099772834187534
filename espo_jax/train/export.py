"""Export of the trained policy: a Hugging Face directory (weights + tokenizer files)."""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import jax
from etils import epath

from espo_jax.train.distributed import to_host

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def export_final_policy(state, config, tok, workdir: pathlib.Path) -> pathlib.Path | None:
    """workdir/final_policy on process 0; None on the others. Call it on EVERY process:
    the parameters are first gathered to host memory collectively (other hosts hold
    shards that process 0 cannot read on its own)."""
    host_state = state.replace(params=to_host(state.params), rest=to_host(state.rest))
    if jax.process_index() != 0:
        return None
    return export_policy(host_state, config, tok, workdir)


def export_policy(state, config, tok, workdir) -> epath.Path:
    """Writes workdir/final_policy (HF weights + the tokenizer files); state on host.
    A non-local workdir (gs://...) gets a local export copied over with epath."""
    if "://" in os.fspath(workdir):
        with tempfile.TemporaryDirectory() as tmp:
            local = export_policy(state, config, tok, pathlib.Path(tmp))
            out = epath.Path(workdir) / "final_policy"
            if out.exists():
                out.rmtree()
            out.mkdir(parents=True, exist_ok=True)
            for f in local.iterdir():
                (out / f.name).write_bytes(f.read_bytes())
        return out
    return _export_local(state, config, tok, pathlib.Path(workdir))


def _export_local(state, config, tok, workdir: pathlib.Path) -> pathlib.Path:
    from espo_jax.models import save_pretrained  # noqa: PLC0415

    from espo_jax.models.hf_io import source_dtype  # noqa: PLC0415

    out = workdir / "final_policy"
    if out.exists():
        shutil.rmtree(out)
    src = pathlib.Path(config.model.path)
    # export.dtype: "auto" stores in the source checkpoint's dtype (else the masters' own).
    dtype = config.export.dtype
    if dtype == "auto":
        dtype = source_dtype(src)
    save_pretrained(state.model(), str(out), dtype=dtype)
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
            copied = True
    if not copied and not (out / "tokenizer.json").exists():
        tok.save_pretrained(str(out))
    return out
