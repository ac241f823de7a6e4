"""``evaluation.attack_graphs``: an attack's passes replayed per batch bucket.

On the CPU the bucket machinery runs with eager stand-ins of the graphs (``emulate=True``): the
padding, the slicing, the capture check, the order of forward and backward, what drops the
graphs. The graphs themselves are ``tests/test_cuda.py``'s (skipped without a GPU).
"""

from __future__ import annotations

import gc
import weakref
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from stablenets.evaluation.attack_graphs import GraphedModel, bucket
from stablenets.evaluation.radius_sweep import SearchModel, fast_search
from stablenets.evaluation.robustness import Autocast, autoattack_l2, eval_mode, pgd_l2
from stablenets.nn.models import build_model
from stablenets.nn.operators import held_values

SHAPE = (3, 8, 8)


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 5),
    ).eval()


def paper_block_classifier() -> nn.Module:
    torch.manual_seed(1)
    kwargs = {"base_width": 4, "blocks_per_stage": 1, "input_size": 8}
    return build_model("nonexpansive_classifier", **kwargs).double().eval()


def graphed_model(model: nn.Module, max_batch: int = 1024, **kwargs) -> GraphedModel:
    """``model`` behind the bucket machinery, each replay an eager pass (``emulate``)."""
    return GraphedModel(model, max_batch, SearchModel.GRAPH_TOL["float32"], emulate=True, **kwargs)


def points(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def logits_and_gradient(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and the gradient of a fixed, sample-dependent loss of them to the input."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.arange(1.0, out.shape[1] + 1, dtype=out.dtype)
    (grad,) = torch.autograd.grad((out.tanh() * weights).sum(), x)
    return out.detach(), grad


def test_a_batch_runs_in_the_bucket_of_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 500, 512, 513)] == [
        1, 2, 4, 4, 8, 8, 16, 512, 512, 1024
    ]  # fmt: skip
    with pytest.raises(ValueError, match="at least one sample"):
        bucket(0)


@pytest.mark.parametrize("make", [conv_net, paper_block_classifier], ids=["conv", "paper_block"])
def test_replayed_passes_are_the_models_at_every_batch_size(make):
    """Logits and input gradients of every batch size, twice each (the second replays): the
    model's own, to rounding, whatever the earlier batches left in the bucket."""
    model = make()
    dtype = next(model.parameters()).dtype
    graphed = graphed_model(model)
    with eval_mode(model):
        for round_ in range(2):
            for n in (7, 5, 1, 3, 8, 2, 6):  # buckets reused by smaller batches after larger
                x = points(n, seed=10 * n + round_, dtype=dtype)
                ours, eager = logits_and_gradient(graphed, x), logits_and_gradient(model, x)
                for a, b in zip(ours, eager, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphed.enabled and graphed.captures == 4  # buckets 1, 2, 4, 8, each on its first batch
    assert graphed.replays == 14 and graphed.eager_passes == 0  # every forward pass replayed


def test_forward_passes_without_a_gradient_replay_the_same_graph():
    model = conv_net()
    graphed = graphed_model(model)
    x = points(3, seed=1)
    with torch.no_grad():
        graphed(x), graphed(x)  # captured, then replayed
        out = graphed(x)
    assert graphed.captures == 1 and graphed.replays == 3 and not out.requires_grad
    torch.testing.assert_close(out, model(x).detach())


def test_the_gradient_of_a_pass_that_a_later_pass_replaced_raises():
    """The attacks take each gradient before the next pass; one taken after would read the later
    pass's activations, so it raises instead of returning a wrong gradient."""
    graphed = graphed_model(conv_net())
    x, z = points(3, seed=2).requires_grad_(True), points(4, seed=3).requires_grad_(True)
    first = graphed(x)  # captured
    graphed(z)  # the same bucket (4), replayed
    with pytest.raises(RuntimeError, match="a later pass of the same bucket replaced"):
        torch.autograd.grad(first.sum(), x)


def test_one_pass_back_propagated_several_times_gives_each_row_of_the_jacobian():
    """FAB's pattern: one forward pass, one backward per class with ``retain_graph``."""
    model = conv_net()
    graphed = graphed_model(model)
    x = points(3, seed=4)
    xg = x.clone().requires_grad_(True)
    out = graphed(xg)
    assert graphed.captures == graphed.replays == 1
    expected = torch.autograd.functional.jacobian(lambda v: model(v).sum(0), x)
    for k in range(out.shape[1]):
        mask = torch.zeros_like(out)
        mask[:, k] = 1
        (grad,) = torch.autograd.grad(out, xg, mask, retain_graph=True)
        torch.testing.assert_close(grad, expected[k], rtol=1e-5, atol=1e-6)


class BatchCentred(nn.Module):
    """Logits that depend on the other samples of the batch: padding would change them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x - x.mean(0, keepdim=True))


def test_a_model_that_mixes_samples_turns_graphs_off_in_one_line_and_stays_exact():
    model, lines = BatchCentred().eval(), []
    graphed = graphed_model(model, log=lines.append)
    x = points(3, seed=5)
    for _ in range(3):
        out = graphed(x)
        torch.testing.assert_close(out, model(x))
    assert not graphed.enabled and graphed.replays == 0
    assert len(lines) == 1 and lines[0].startswith("attack graphs off: capture failed (")
    assert "differ from the eager pass on the batch alone" in lines[0] and "bucket 4" in lines[0]
    assert "attack graphs off" in graphed.summary()


def test_a_weight_edited_after_a_capture_drops_the_graphs():
    """A graph replays the sub-step counts and weights it was captured with; an edit (version
    counter) or a swapped storage drops every graph, and the next pass is the new model's."""
    model = paper_block_classifier()
    graphed = graphed_model(model)
    x = points(3, seed=6, dtype=torch.float64)
    for _ in range(2):
        graphed(x)
    assert graphed.captures == 1
    weight = next(model.parameters())
    with torch.no_grad():
        weight.mul_(1.5)
    torch.testing.assert_close(graphed(x), model(x))
    assert graphed.captures == 2  # captured again
    weight.data = weight.data.clone()  # the same values in a new storage
    graphed(x)
    assert graphed.captures == 3


def test_a_capture_keeps_what_its_scope_held_alive_for_the_scopes_after_it():
    """An orthogonal block's Cayley symbol is held by the ``pinned_weights`` scope of an attack
    (``eval_mode``) and freed when it ends; a CUDA graph captured in that scope reads its
    memory, and replays in the next scope (the sweep's, then the bisection's): the capture keeps
    it alive, unchanged, as long as the capture lives."""
    torch.manual_seed(2)
    model = build_model("orthogonal_classifier", base_width=4, stages=2, blocks_per_stage=1,
                        num_classes=5, input_size=8).eval()  # fmt: skip
    graphed = graphed_model(model)
    x = points(3, seed=8)
    with eval_mode(model):
        graphed(x)
        held = [weakref.ref(t) for t in held_values(model)]
        expected = graphed(x)
    assert graphed.captures == 1 and len(held) == 2
    gc.collect()
    assert all(ref() is not None for ref in held)  # the scope ended; the capture keeps them
    with eval_mode(model):
        torch.testing.assert_close(graphed(x), expected, rtol=0, atol=0)
    assert graphed.captures == 1 and graphed.replays >= 2
    graphed.release()
    gc.collect()
    assert all(ref() is None for ref in held)


def test_pgd_and_autoattack_find_the_same_examples_on_the_graphed_model():
    """The attacks' own calls (AutoAttack's checks and its APGD, PGD's steps) through the
    buckets: the examples of the plain model, every batch size included."""
    model = conv_net(seed=7)
    x = points(6, seed=8)
    with torch.no_grad():
        y = model(x).argmax(1)
    pgd = partial(pgd_l2, steps=5, rel_step=0.2)
    aa = partial(autoattack_l2, version="custom", attacks=["apgd-ce"], iterations=5, batch_size=4)
    for attack in (pgd, aa):
        graphed = graphed_model(model)
        ours, plain = attack(graphed, x, y, 0.5, seed=3), attack(model, x, y, 0.5, seed=3)
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
        assert graphed.replays > 0


def test_a_graphed_search_on_a_cpu_is_the_model_itself():
    """``cuda_graphs: true`` on a machine without CUDA: the plain attack, on the model itself,
    and nothing for the job's log."""
    model = conv_net(seed=9)
    x = points(5, seed=10)
    with torch.no_grad():
        y = model(x).argmax(1)
    search = SearchModel("float32", cuda_graphs=True)
    pgd = partial(pgd_l2, steps=3, rel_step=0.2)
    ours = fast_search(pgd, search)(model, x, y, 0.3, seed=1)
    torch.testing.assert_close(ours, pgd(model, x, y, 0.3, seed=1))
    assert search(model) is model and search.summary() is None


def test_a_bfloat16_search_model_in_an_evaluation_scope_is_replayed():
    """The autocast wrapper is the graphed model's, not the evaluated model's: what decides
    whether passes replay is the evaluated model's modules, in ``eval_mode`` or not."""
    model = paper_block_classifier().float().train()
    wrapper = Autocast(model, cache=False)
    wrapper.training = False  # as SearchModel leaves it
    graphed = graphed_model(wrapper)
    x = points(3, seed=11)
    graphed(x)  # the model trains: eager
    assert graphed.eager_passes == 1 and graphed.captures == 0
    with eval_mode(model):
        torch.testing.assert_close(graphed(x), Autocast(model)(x))
        graphed(x)
    assert graphed.captures == 1 and graphed.replays == 2


class RunsOutOfMemory(nn.Module):
    """``conv_net`` that raises CUDA's out-of-memory error on batches of ``limit`` or more."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.net, self.limit = conv_net(), limit

    def forward(self, x: Tensor) -> Tensor:
        if len(x) >= self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_a_bucket_that_does_not_fit_stays_eager_and_the_others_replay():
    model, lines = RunsOutOfMemory(limit=8).eval(), []
    graphed = graphed_model(model, log=lines.append)
    for n in (5, 5, 3, 7):  # bucket 8 runs out of memory (once, said once), bucket 4 fits
        torch.testing.assert_close(graphed(points(n, seed=n)), model(points(n, seed=n)))
    assert graphed.enabled and graphed.captures == 1 and graphed.replays == 1
    assert graphed.eager_passes == 3
    assert lines == [
        "attack graphs: bucket 8 does not fit (CUDA out of memory. Tried to allocate 2.00 GiB); "
        "eager there"
    ]


def test_batches_above_the_largest_graphed_one_run_eagerly_and_release_drops_the_graphs():
    model = conv_net()
    graphed = graphed_model(model, max_batch=4)
    for n in (4, 5, 3):
        graphed(points(n, seed=n))
    assert (graphed.captures, graphed.replays, graphed.eager_passes) == (1, 2, 1)
    graphed.release()
    graphed(points(3, seed=1))
    assert graphed.captures == 2
    with pytest.raises(ValueError, match="max_batch"):
        GraphedModel(model, max_batch=0, tol=0.02)


def test_a_model_in_training_mode_is_never_replayed():
    model = conv_net().train()
    graphed = graphed_model(model)
    graphed(points(3, seed=1))
    assert graphed.captures == 0 and graphed.eager_passes == 1


def test_a_search_model_leaves_the_evaluated_models_modes_alone():
    model = paper_block_classifier().train()
    SearchModel("bfloat16")(model)
    assert all(m.training for m in model.modules())
