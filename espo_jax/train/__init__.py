"""Training: state, optimizer, jitted score/train steps, the RL loop, checkpoints, evaluation.

Kept import-light (``espo_jax.train.mesh`` is imported by other modules); the loop lives in
``espo_jax.train.loop`` (``run(config, workdir)``).
"""


def run(config, workdir):
    """Train (or resume) according to ``config``, writing everything under ``workdir``."""
    from espo_jax.train.loop import run as _run  # noqa: PLC0415

    return _run(config, workdir)
