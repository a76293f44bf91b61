"""Shared test set-up: 8 host devices for sharding tests, x64 off, GPU-marked tests skipped off Hopper."""
import os

# Must be set before jax initialises its CPU backend.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _map_count() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    """Every compiled XLA CPU executable holds memory mappings, and a test worker that builds many engines reaches
    the kernel's per-process limit (vm.max_map_count, 65,530 by default); past it even a 1 MB allocation fails
    (MemoryError) or XLA crashes mid-compile. Once a test leaves the count high, drop the compiled functions
    nothing holds any more (4 LoRA engine tests: 6,562 mappings, 668 after)."""
    yield
    if _map_count() > 20_000:
        import gc
        gc.collect()
        jax.clear_caches()
        gc.collect()
