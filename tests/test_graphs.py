"""CUDA-graph bookkeeping that the CPU can check (``graphs.py``; captures and replays themselves
are in ``test_cuda.py``, which runs them when a GPU is present).

* ``substep_key`` is what the forward pass freezes into a graph: each block's sub-step count and
  step size, equal to what its forward pass uses, and it leaves the same per-block diagnostics.
* CPL's device-side step (read from the norm buffer while a graph is captured) is the host step,
  never above the stable limit, for norms spread over ten orders of magnitude.
* ``train.cuda_graphs`` on the CPU changes nothing (bitwise the same weights).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from stablenets.nn.activations import build_activation
from stablenets.nn.families import CPLBlock
from stablenets.nn.models import build_model
from stablenets.nn.operators import DenseOperator
from stablenets.train.augment import AugmentConfig
from stablenets.train.cuda_graphs import substep_key
from stablenets.train.loop import TrainConfig, step_graphs, train
from stablenets.train.tasks import ClassificationTask

SMALL = {"base_width": 4, "stages": 2, "blocks_per_stage": 2, "input_size": 8}


def test_substep_key_is_what_the_forward_pass_uses():
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", **SMALL).train()
    blocks = list(model.constrained_blocks())
    for i, block in enumerate(blocks):  # different counts per block
        block.time.mul_(1 + 2 * i)
    key = substep_key(model)
    stats = model.block_stats()
    model(torch.rand(2, 3, 8, 8))
    assert model.block_stats() == stats  # the diagnostics a replay leaves are the forward's
    assert [n for n, _ in key] == [b.last_substeps for b in blocks]
    assert len({n for n, _ in key}) > 1
    for (n, h), block in zip(key, blocks, strict=True):
        assert h == block.time_value() / n
    blocks[0].time.mul_(2.0)  # an in-place edit of T: a new key (the host copy is invalidated)
    assert substep_key(model) != key


def test_cpl_device_step_is_the_host_step_and_stays_stable():
    cpl = CPLBlock(DenseOperator(3, 3), build_activation("leaky_relu"), theta=0.5)
    g = torch.Generator().manual_seed(0)
    norms = torch.cat([10 ** (torch.rand(4000, generator=g) * 10 - 5), torch.tensor([0.0, 1.0])])
    for norm in norms.tolist():
        cpl.operator.sigma_estimate.fill_(norm)
        stored = float(cpl.operator.sigma_estimate)  # the buffer is float32
        h, host = float(cpl.device_step_size()), cpl.step_size(stored)
        assert float(cpl.device_step_size(-1.0)) == -h
        if stored == 0:
            assert h == host == 1.0
            continue
        assert host * (1 - 1e-14) <= h <= host, stored
        assert h * cpl._ell(stored) / 2 <= 0.5, stored


def test_cuda_graphs_setting_is_inert_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    model = build_model("cpl_classifier", **SMALL)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    task = ClassificationTask(x, y, x[:8], y[:8], AugmentConfig(), eval_batch=8)
    cfg = TrainConfig(steps=3, batch_size=4, lr_max=0.05, val_every=3, log_every=1)
    graphed = dataclasses.replace(cfg, cuda_graphs=True)
    assert step_graphs(model, task, graphed, torch.device("cpu"), print) is None
    logs: list[str] = []
    a, _ = train(copy.deepcopy(model), task, cfg, tmp_path / "a", "h", lambda _: None)
    b, _ = train(copy.deepcopy(model), task, graphed, tmp_path / "b", "h", logs.append)
    assert not any("cuda graphs" in line for line in logs)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key
