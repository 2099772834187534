"""Command line entry point: parse flags, validate, then train (``espo_jax.train.run``).

    python -m espo_jax.main --config=configs/default.py[:smoke] --workdir=runs/demo \
        [--config.train.lr=1e-4 ...] [--debug] [--dry_run]

--dry_run: compile only and write WORKDIR/memory_plan.json (``espo_jax.train.dry_run``).

The config is a locked ml_collections ConfigDict, so an unknown ``--config.<key>`` fails
with a message naming the key. Re-running with the same --workdir resumes from its latest
checkpoint (refusing changes to the model, objective, task, mesh or seed unless
``--config.resume.allow_changes=...``); --workdir may be local or a bucket (gs://...).

Exit codes: 0 done (or stopped by SIGTERM with a checkpoint), 1 non-finite stop,
2 a configuration or input error: one line ``error: <what, where, allowed>`` on stderr, no
traceback (``--debug`` or ``ESPO_DEBUG=1`` shows it). Internal errors keep their traceback.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def define_flags(fv: flags.FlagValues) -> None:
    """--config, --workdir, --debug on ``fv`` (the global FLAGS; tests pass a fresh one)."""
    config_flags.DEFINE_config_file(
        "config", None, "Path to a configs/*.py file, optionally with ':arg' (e.g. ':smoke').",
        flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots "
                        "(local or gs://...).", flag_values=fv)
    flags.DEFINE_bool("debug", False, "Show tracebacks for configuration errors too "
                      "(also ESPO_DEBUG=1).", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Compile the train step, scoring pass and rollout "
                      "from model.path/config.json alone (no weights, tokenizer or data), "
                      "print per-device memory and write WORKDIR/memory_plan.json.",
                      flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


define_flags(flags.FLAGS)
USAGE_EXIT = 2


def _debug(argv=None, fv: flags.FlagValues = flags.FLAGS) -> bool:
    if os.environ.get("ESPO_DEBUG", "") not in ("", "0"):
        return True
    if argv is not None:
        return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)
    return bool(fv.is_parsed() and fv["debug"].value)


def one_line(msg: str) -> str:
    """A message on one line (multi-line messages are joined)."""
    return " ".join(s.strip() for s in str(msg).splitlines() if s.strip())


def fail(msg: str) -> None:
    print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def _flag_error(e: Exception, argv: list[str]) -> str:
    """A one-line description of a flag-parsing error, naming the flag."""
    if isinstance(e, (AttributeError, KeyError)):  # config_flags: a key the config lacks
        m = re.search(r"'([A-Za-z0-9_]+)", str(e))
        name = m.group(1) if m else str(e)
        hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', str(e))
        culprit = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                        and name in a.split("=")[0].split(".")), f"--config.*.{name}")
        return (f"{culprit}: unknown config key {name!r}"
                + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
                + "; all keys are in configs/_base.py")
    msg = str(e)
    if "Traceback (most recent call last)" in msg:  # the config file's get_config raised
        head = msg.split("Error whilst parsing config file")[0].rstrip(": \n")
        last = [s for s in msg.splitlines() if s.strip()][-1].strip()
        return f"{head}: {last}"
    return msg


def parse_flags(argv: list[str], fv: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl flag parsing with one-line errors (exit 2) instead of absl's usage dump."""
    try:
        return fv(argv)
    except (flags.Error, AttributeError, ValueError, TypeError, KeyError) as e:
        if _debug(argv):
            raise
        fail(_flag_error(e, argv))
    return []


def main(argv, fv: flags.FlagValues = flags.FLAGS):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags are --config, --workdir, "
             "--config.<key>=<value>, --debug, --dry_run")
    if "verbosity" in fv and not fv["verbosity"].present:  # orbax logs every save at INFO; -v 0 for it
        logging.set_verbosity(logging.WARNING)
    # Imported after the flags (keeps --help fast): the dry run or the training loop.
    from espo_jax.train.checkpoint import CheckpointError  # noqa: PLC0415
    from espo_jax.train.loop import NonFiniteError  # noqa: PLC0415
    if "dry_run" in fv and fv["dry_run"].value:
        from espo_jax.train.dry_run import run  # noqa: PLC0415
    else:
        from espo_jax.train import run  # noqa: PLC0415
    try:
        run(fv["config"].value, fv["workdir"].value)
    except NonFiniteError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        if _debug(fv=fv):
            raise
        fail(_describe(e))
    return 0


def _describe(e: Exception) -> str:
    msg = one_line(str(e)) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and not re.search(
            re.escape(str(e.filename)), msg):
        msg = f"{msg} ({e.filename})"
    return msg


def entry():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
