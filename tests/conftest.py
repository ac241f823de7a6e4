"""Shared test setup: one torch thread per test module, a cartoon test image, and the smoke
pipeline run once per session (on one worker: its readers form one xdist group)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from workflow_helpers import SMOKE_PROFILE, copy_workflow, snakemake


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny models and tensors run far faster on one thread (no OpenMP contention on a loaded
    machine); the previous thread count comes back after the module. Subprocesses (the pipeline
    and training tests) do not inherit it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tf32_flags() -> tuple[bool, bool]:
    """Whether TF32 is allowed in convolutions and in matrix products."""
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def tf32_on() -> Iterator[None]:
    """TF32 allowed in both (a GPU's default for convolutions), the flags restored after."""
    before = tf32_flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def cartoon(n: int = 2, c: int = 3, h: int = 32, w: int = 40) -> torch.Tensor:
    """Float64 piecewise-constant images in [0, 1]: two overlapping rectangles on a dark
    background (the second image mirrored)."""
    x = torch.full((n, c, h, w), 0.1, dtype=torch.float64)
    x[:, :, h // 6 : h // 2, w // 5 : 3 * w // 5] = 0.9
    x[:, 0, h // 3 : h - 2, w // 2 : w - 3] = 0.4
    x[1:] = x[1:].flip(-1)
    return x


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """Run the smoke pipeline once in a fresh copy of the workflow; tests read its results."""
    work = copy_workflow(tmp_path_factory.mktemp("smoke"))
    done = snakemake(work, *SMOKE_PROFILE)
    assert done.returncode == 0, done.stderr[-4000:]
    return work


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read the smoke pipeline's results share one ``xdist_group``: under
    ``make test``'s workers (pytest-xdist, ``--dist loadgroup``) they run on one worker, so the
    pipeline runs once (a session fixture is per worker)."""
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smoke"))


def fail_torch_load_once(monkeypatch: pytest.MonkeyPatch, failure: BaseException) -> None:
    """``torch.load`` raises ``failure`` at its next call, then loads as usual: a read the
    machine fails once (an I/O error of a network file system, permissions, memory)."""
    load = torch.load
    failed: list[int] = []

    def fails_once(*args, **kwargs) -> object:  # noqa: ANN002, ANN003
        if not failed:
            failed.append(1)
            raise failure
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", fails_once)
