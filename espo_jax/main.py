"""Command line entry point: parse flags, then train (``espo_jax.train.run``).

    python -m espo_jax.main --config=configs/default.py[:smoke] --workdir=runs/demo \
        [--config.train.lr=1e-4 ...]

The config is a locked ml_collections ConfigDict, so an unknown ``--config.<key>`` fails
with a message naming the key. Re-running with the same --workdir resumes from its latest
checkpoint.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file, optionally with ':arg' (e.g. ':smoke').",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 for it
        logging.set_verbosity(logging.WARNING)
    from espo_jax.train import run  # noqa: PLC0415  (after flags: keep --help fast)
    from espo_jax.train.loop import NonFiniteError  # noqa: PLC0415

    try:
        run(_CONFIG.value, _WORKDIR.value)
    except NonFiniteError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 1


def entry():
    app.run(main)


if __name__ == "__main__":
    entry()
