"""Shared machinery of the experiment sweeps: define, run (resumable, parallel), aggregate, plot, report.

Used by ``experiments/compare_objectives.py``, ``experiments/ablations.py`` and
``experiments/countdown_sweep.py``. It drives the
runner like a user does, one subprocess per run::

    python -m espo_jax.main --config=CONFIG[:smoke,OBJECTIVE] --workdir=RUNS/<slug>/seed<k> \
        --config.seed=k [--config.num_steps=S] [--config.<key>=<value> ...]

so every run is an isolated process (the parent only loads the config files, to hash what
they resolve to).

Layout::

    RUNS/<slug>/seed<k>/      runner workdir (metrics.jsonl, config.json, run.log, ...)
        spec.json             the command this harness ran (identity of the run)
        done.json             written after a successful run (wall time, return code)
    OUT/report.md, OUT/*.png  the aggregate report (small files; commit these)

``<slug>`` is derived from the config (name + a hash of the resolved config and the policy
weights), objective, overrides and step count, so two
sweeps that ask for the same configuration (e.g. the comparison's ESPO and the ablation's
reference ESPO) share one set of runs.

Resume: a run whose ``done.json`` records the same command is not re-run; an unfinished
workdir is handed to the runner again, which resumes from its latest checkpoint. A
``.lock`` file (with the owner's pid) keeps two sweeps in parallel processes from running
the same workdir at once.

Modules, one concern each: ``specs`` (variants, runs, identity), ``runner`` (subprocesses,
resume, locks, signals), ``results`` (aggregation, tables), ``plots``, ``claims`` (trends,
correlations, verdicts), ``stats`` (paired-seed differences, t-intervals, Holm, AUC),
``cli`` (shared arguments, report, finish). The sweep scripts use
the names re-exported here.
"""
from harness.claims import correlation, trend, verdict
from harness.cli import finish, parse_seeds, parse_sets, run_sweep, seeds_given, sweep_parser
from harness.results import (VariantResult, default_target, final_accuracy, load_results,
                             train_mean)
from harness.specs import REPO, Run, Variant, make_runs

__all__ = ["REPO", "Run", "Variant", "VariantResult", "correlation", "default_target",
           "final_accuracy", "finish", "load_results", "make_runs", "parse_seeds", "parse_sets",
           "run_sweep", "seeds_given", "sweep_parser", "train_mean", "trend", "verdict"]
