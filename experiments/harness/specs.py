"""Experiment specs: variants, runs, and a run's identity (config + weights hash, slug)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import re
import sys
from typing import Any, Sequence



REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "default.py"
DEFAULT_RUNS = REPO / "runs" / "experiments"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of a sweep: an objective plus ``--config.*`` overrides."""
    name: str                       # label in tables and plots, e.g. "espo" or "alpha=0.05"
    objective: str                  # espo | grpo | dapo | gspo | gmpo | cispo
    overrides: tuple[tuple[str, Any], ...] = ()   # (("objective.espo.alpha", 0.05), ...)
    note: str = ""                  # one line for the report


@dataclasses.dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    workdir: pathlib.Path
    argv: tuple[str, ...]           # the full command (also the run's identity)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", s).strip("_")


# Keys that do not change what a run computes (logging, checkpoint cadence, dumps, set-up).
NEUTRAL_KEYS = ("log", "checkpoint", "dump", "distributed", "mesh")
# Keys added to the configs after runs were archived, with the value that reproduces the
# behaviour from before they existed: at that value they are left out of the hash, so adding
# them does not orphan the archived runs (the sweeps would otherwise rerun everything).
ADDED_KEYS = {"rollout.engine_attention": "auto", "rollout.max_concurrent_per_device": 0,
              "rollout.decode_read": 0}


def _repo_relative(node: Any) -> Any:
    """``node`` with every path inside the repository (the configs' checkpoint directories are
    absolute) written relative to it, so a run's hash is the same in any checkout."""
    if isinstance(node, dict):
        return {k: _repo_relative(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_repo_relative(v) for v in node]
    if isinstance(node, str) and node.startswith(str(REPO) + "/"):
        return "<repo>/" + node[len(str(REPO)) + 1:]
    return node


@functools.lru_cache(maxsize=None)
def config_hash(config: pathlib.Path, arg: str = "",
                overrides: tuple[tuple[str, str], ...] = ()) -> str:
    """Short hash of what ``config:arg`` with ``overrides`` resolves to (``get_config(arg)``,
    overridden keys set to their text, minus NEUTRAL_KEYS) and of the policy weights it
    points at. An edited config or a new checkpoint gives new run directories; comment,
    cadence or overridden-key edits do not invalidate finished runs, and neither does moving
    the checkout (paths inside it are hashed relative to it)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(f"_cfg_{abs(hash(str(config)))}", config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg or None).to_dict()
    for key, val in overrides:
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[last] = val
    for k in NEUTRAL_KEYS:
        cfg.pop(k, None)
    for key, old in ADDED_KEYS.items():
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(last, old) == old:
            node.pop(last, None)
    h = hashlib.sha1(json.dumps(_repo_relative(cfg), sort_keys=True, default=str).encode())
    model = pathlib.Path(str(cfg.get("model", {}).get("path", "")))
    if model.is_dir():
        for f in sorted(model.glob("*.safetensors")) + [model / "config.json"]:
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:6]


def variant_slug(config: pathlib.Path, variant: Variant, *, smoke: bool, steps: int | None,
                 extra: Sequence[tuple[str, Any]] = ()) -> str:
    arg = ",".join((["smoke"] if smoke else []) + [variant.objective])
    ov = [(k, _fmt(v)) for k, v in list(variant.overrides) + list(extra)]
    if steps is not None:
        ov.append(("num_steps", str(steps)))
    parts = [config.stem + ("-smoke" if smoke else "") + "-" + config_hash(config, arg,
                                                                           tuple(sorted(ov))),
             variant.objective]
    for k, v in sorted(variant.overrides) + sorted(extra):
        parts.append(f"{k.split('.')[-1]}={_fmt(v)}")
    if steps is not None:
        parts.append(f"steps={steps}")
    return _slug("__".join(parts))


def _portable(config: pathlib.Path) -> str:
    """The config path as the runs name it: relative to the repository (they run there) when
    inside it, so a run's identity (done.json) is the same in any checkout."""
    try:
        return str(pathlib.Path(config).resolve().relative_to(REPO))
    except ValueError:
        return str(config)


def make_runs(variants: Sequence[Variant], seeds: Sequence[int], *, runs_dir: pathlib.Path,
              config: pathlib.Path = DEFAULT_CONFIG, smoke: bool = False,
              steps: int | None = None, extra: Sequence[tuple[str, Any]] = (),
              dump_every: int = 0, dump_variant: str | None = None,
              python: str = sys.executable) -> list[Run]:
    """The runs of a sweep (variants x seeds), with their workdirs and commands.

    extra: overrides applied to every run (e.g. a smaller eval set to fit a CPU budget).
    dump_every > 0 turns on the runner's rollout dumps for ``dump_variant`` (seed 0 only).
    """
    runs = []
    for v in variants:
        wd_root = runs_dir / variant_slug(config, v, smoke=smoke, steps=steps, extra=extra)
        arg = ",".join((["smoke"] if smoke else []) + [v.objective])
        for seed in seeds:
            argv = [python, "-m", "espo_jax.main", f"--config={_portable(config)}:{arg}",
                    f"--workdir={wd_root / f'seed{seed}'}", f"--config.seed={seed}",
                    "--config.log.progress=False", "--config.log.tensorboard=False"]
            if steps is not None:
                argv.append(f"--config.num_steps={steps}")
            for k, val in list(v.overrides) + list(extra):
                argv.append(f"--config.{k}={_fmt(val)}")
            if dump_every > 0 and v.name == dump_variant and seed == seeds[0]:
                argv.append(f"--config.dump.every={dump_every}")
            runs.append(Run(v, seed, wd_root / f"seed{seed}", tuple(argv)))
    # Seed-major order: a sweep cut short still has every variant at the first seeds.
    return sorted(runs, key=lambda r: seeds.index(r.seed))
