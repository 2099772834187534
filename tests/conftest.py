"""Test-wide set-up: 8 host CPU devices for the sharding tests, float32 matmuls.

XLA_FLAGS must be set before jax is first imported, so this runs at collection start.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Modules with a ``slow`` test first (stable otherwise): ``make test`` spreads whole
    modules over 2 workers (pytest-xdist, --dist loadfile) in collection order, so the long
    end-to-end modules starting last would leave one worker idle at the end."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
