"""What the sampler benchmarks share (``sampler.py``, ``tunix_sampler.py``): the model
shape and the command line of the uniform and ragged workloads. Imports neither torch
(absent from Tunix's venv) nor Tunix (absent from the project's)."""
from __future__ import annotations

import argparse

# The benchmarks' random Qwen3 (transformers.Qwen3Config fields). Long positions so that
# the long-prompt run (--prompt-len 2048) fits; they change no RoPE value.
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, intermediate_size=768, vocab_size=32000, max_position_embeddings=8192,
             rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)


def workload_parser(doc: str, *, reps: int, quick_help: str) -> argparse.ArgumentParser:
    """An argument parser with the workload flags; each script adds its own."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--ragged", action="store_true", help="the ragged workload instead")
    ap.add_argument("--ragged-prompts", type=int, default=64)
    ap.add_argument("--ragged-k", type=int, default=16)
    ap.add_argument("--ragged-cap", type=int, default=256)
    ap.add_argument("--sampling", default="gumbel", choices=("gumbel", "inverse_cdf"))
    return ap
