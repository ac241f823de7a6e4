"""CUDA graphs of an attack's forward and backward passes, one per batch bucket.

An attack on the paper's classifier (0.25M parameters, 32x32 images, 50 or more integrator
sub-steps in ``eval()``) spends its time in thousands of forward passes and input gradients of
one fixed function: launch-bound work, like a training step of the same model, which CUDA graphs
made 1.6x faster (``benchmarks/README.md``). In ``eval()`` with pinned weights the model reads
nothing on the host per pass (``tests/test_models.py``), so a pass can be captured once and
replayed. What a graph freezes is the input's shape, and attacks change their batch as points
break (Square queries only the points it has not fooled yet), so a batch of ``n`` runs in the
graph of its bucket, the next power of two, padded with zeros: every model here treats each
sample on its own, which a capture checks (below).

Policy:

* a bucket is captured on its first batch, after two warm-up passes on a side stream (so that
  AutoAttack's checks, which call the model five times on one batch and compare, see one graph);
  its forward graph serves passes with and without a gradient;
* a capture is checked against eager passes on the padded batch and on the batch alone (logits
  and input gradient, to ``tol``): a capture that computes something else, or a model that
  mixes the samples of a batch, turns graphs off with a log line, and the attack goes on eagerly;
* a parameter or buffer edited since a capture (its version counter or storage moved) drops every
  graph: a graph would replay the old sub-step counts;
* a backward pass is replayed for the forward pass of its bucket that came last; asking for the
  gradient of an earlier one raises (its activations were overwritten), as the attacks here never
  do. Outputs and gradients are copies, free of the graph's memory.

Memory: each bucket keeps its activations in its own pool, so the graphs hold about twice the
activation memory of the largest bucket. Batches above ``max_batch`` (compute-bound anyway) run
eagerly, and a bucket whose capture runs out of memory stays eager while smaller ones replay.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from stablenets.errors import first_line
from stablenets.nn.operators import held_values

__all__ = ["GraphedModel", "bucket"]


def bucket(n: int) -> int:
    """The batch a graph of ``n`` samples runs at: the next power of two (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"a bucket needs at least one sample, got {n}")
    return 1 << (n - 1).bit_length()


@dataclass
class _Capture:
    """One bucket's static tensors and its two replays (graphs, or eager stand-ins)."""

    x: Tensor  # the padded input (requires grad)
    out: Tensor
    grad_out: Tensor
    grad_x: Tensor
    forward: Callable[[], None]
    backward: Callable[[], None]
    generation: int = 0
    filled: int = 0  # rows of x holding a real sample since the last zeroing
    # what pinned_weights held when captured (a Cayley symbol): the graphs read their memory,
    # so they live as long as the capture, past the scope (nn.operators.held_values)
    held: list[Tensor] = field(default_factory=list)


class _Replay(torch.autograd.Function):
    """``model(x)`` replayed from ``capture`` (x padded to its bucket); its backward replays the
    input gradient. One autograd node, no activations outside the graph's memory."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, capture: _Capture) -> Tensor:
        n = len(x)
        capture.x[:n].copy_(x)
        if capture.filled > n:  # padding rows hold zeros, not an earlier batch's samples
            capture.x[n:].zero_()
        capture.filled = n
        capture.forward()
        capture.generation += 1
        ctx.capture, ctx.generation, ctx.n = capture, capture.generation, n
        return capture.out[:n].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # pyright: ignore[reportIncompatibleMethodOverride] (once_differentiable)
        ctx: Any, *grad_outputs: Any
    ) -> tuple[Tensor, None]:
        (grad,) = grad_outputs
        capture: _Capture = ctx.capture
        if capture.generation != ctx.generation:
            raise RuntimeError(
                "GraphedModel: the gradient of a forward pass that a later pass of the same "
                "bucket replaced (its activations are gone); take each gradient before the next "
                "forward pass"
            )
        capture.grad_out[: ctx.n].copy_(grad)
        capture.grad_out[ctx.n :].zero_()
        capture.backward()
        return capture.grad_x[: ctx.n].clone(), None


def _touch_marks(model: nn.Module) -> list[tuple[int, int]]:
    """Version counter and storage of every parameter and buffer: what moves when one is edited."""
    return [
        (t._version, t.data_ptr()) for t in itertools.chain(model.parameters(), model.buffers())
    ]


class GraphedModel(nn.Module):
    """``model`` as an attack sees it, its passes replayed from CUDA graphs per batch bucket.

    ``model`` must be a fixed function of its input (evaluation mode, weights pinned, as
    ``robustness.eval_mode`` sets them) that treats each sample on its own. Batches of more than
    ``max_batch`` samples, and every pass on a device other than the current CUDA device (or under
    an outer autocast, or with any of ``model``'s modules in training mode), run eagerly,
    unchanged; ``emulate=True`` runs the bucket machinery on any device, each replay an eager
    pass on the padded batch (what the CPU tests check). ``tol``: how far (relative to the
    largest magnitude) a capture's logits and input gradient may be from the eager pass's (bf16
    rounds more than float32). ``log`` gets the line saying graphs are off, or that one bucket
    did not fit in memory.
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch: int,
        tol: float,
        emulate: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch, self.tol, self.emulate = model, max_batch, tol, emulate
        self.log = log
        self._watched = list(model.modules())  # a wrapper's flag alone says nothing
        self.enabled = True
        self.captures = self.replays = self.eager_passes = 0
        self._captures: dict[tuple, _Capture] = {}
        self._too_large: set[tuple] = set()  # buckets whose capture ran out of memory
        self._marks: list[tuple[int, int]] = []

    def forward(self, x: Tensor) -> Tensor:
        if not self._replayable(x):
            return self._eager(x)
        if self._captures and _touch_marks(self.model) != self._marks:
            self._captures.clear()  # the weights moved: the graphs' sub-steps may be stale
        key = (bucket(len(x)), tuple(x.shape[1:]), x.dtype, x.device)
        capture = self._captures.get(key) or self._capture(key, x)
        if capture is None:
            return self._eager(x)
        self.replays += 1
        return _Replay.apply(x, capture)

    def release(self) -> None:
        """Drop every graph and its memory (graphs are captured again when needed)."""
        self._captures.clear()

    def summary(self) -> str:
        """One line for a log: graphs on or off, captures, replays and eager passes."""
        state = "on" if self.enabled else "off"
        return (
            f"attack graphs {state}: {self.captures} captured, {self.replays} passes replayed, "
            f"{self.eager_passes} eager"
        )

    def _replayable(self, x: Tensor) -> bool:
        if not self.enabled or not 0 < len(x) <= self.max_batch:
            return False
        if any(m.training for m in self._watched):
            return False
        if self.emulate:
            return True
        return (
            x.device.type == "cuda"
            and x.device.index == torch.cuda.current_device()
            and not torch.is_autocast_enabled("cuda")
        )

    def _eager(self, x: Tensor) -> Tensor:
        self.eager_passes += 1
        return self.model(x)

    def _capture(self, key: tuple, x: Tensor) -> _Capture | None:
        """The bucket's capture, on its first batch, checked; ``None``: run eagerly (a bucket that
        ran out of memory stays eager, any other failure turns graphs off)."""
        if key in self._too_large:
            return None
        size = key[0]
        static = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        static[: len(x)] = x.detach()
        static.requires_grad_(True)
        before = None if self.emulate else torch.cuda.current_stream()
        try:
            capture = (self._emulated if self.emulate else self._graphed)(static)
            self._check(capture, x)
        except RuntimeError as err:
            if before is not None:  # a capture that fails at its end leaves its stream on
                torch.cuda.set_stream(before)
            self._failed(key, err)
            return None
        capture.held = held_values(self.model)
        self._captures[key] = capture
        self._marks = _touch_marks(self.model)
        self.captures += 1
        return capture

    def _emulated(self, static: Tensor) -> _Capture:
        """Eager stand-ins of the two replays, on the same static tensors as graphs."""

        def forward() -> None:
            with torch.no_grad():
                capture.out.copy_(self.model(capture.x))

        def backward() -> None:
            with torch.enable_grad():
                x = capture.x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.model(x), x, capture.grad_out)
            capture.grad_x.copy_(g)

        with torch.no_grad():
            out = self.model(static)
        grads = torch.zeros_like(out), torch.zeros_like(static)
        capture = _Capture(static, out, *grads, forward=forward, backward=backward)
        return capture

    def _graphed(self, static: Tensor) -> _Capture:
        """Forward and backward captured in graphs sharing one private memory pool (the backward
        graph keeps the autograd graph, so it can be replayed for every forward replay)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.enable_grad():  # lazy set-up outside the capture
            for _ in range(2):
                out = self.model(static)
                torch.autograd.grad(out, static, torch.ones_like(out))
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.enable_grad():
            with torch.cuda.graph(fwd, pool=pool):
                out = self.model(static)
            grad_out = torch.zeros_like(out)
            with torch.cuda.graph(bwd, pool=pool):
                (grad_x,) = torch.autograd.grad(out, static, grad_out, retain_graph=True)
        return _Capture(static, out, grad_out, grad_x, fwd.replay, bwd.replay)

    def _check(self, capture: _Capture, x: Tensor) -> None:
        """The replays against eager passes: on the padded batch (the same shapes: a capture
        that computes something else) and on ``x`` alone (a model that mixes the samples of a
        batch, which padding would change), logits and the input gradient along a fixed
        direction; ``RuntimeError`` beyond ``tol``. Only the first ``len(x)`` rows count."""
        n = len(x)
        replayed = _Replay.apply(x.detach(), capture)
        direction = torch.linspace(-1, 1, replayed.shape[1], dtype=replayed.dtype)
        direction = direction.to(replayed.device).expand(len(capture.x), -1)
        capture.grad_out.copy_(direction)
        capture.backward()
        ours = (replayed, capture.grad_x[:n])
        for what, inputs in (("the padded batch", capture.x.detach()), ("the batch alone", x)):
            eager = self._eager_pass(inputs, direction[: len(inputs)])
            for name, a, b in zip(("logits", "input gradient"), ours, eager, strict=True):
                scale = float(b[:n].abs().max()) or 1.0
                err = float((a - b[:n]).abs().max())
                if not err <= self.tol * scale:
                    raise RuntimeError(
                        f"the replayed {name} differ from the eager pass on {what} by {err:.3g} "
                        f"(of {scale:.3g}) at batch {n} in bucket {len(capture.x)}"
                    )

    def _eager_pass(self, x: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
        """Eager logits of ``x`` and the gradient of ``<logits, direction>`` to it."""
        with torch.enable_grad():
            xe = x.detach().clone().requires_grad_(True)
            out = self.model(xe)
            (grad,) = torch.autograd.grad(out, xe, direction)
        return out.detach(), grad

    def _failed(self, key: tuple, err: RuntimeError) -> None:
        """A bucket that ran out of memory (CUDA's allocation error; graphs are CUDA's) stays
        eager, smaller ones may fit; any other failure turns graphs off."""
        if isinstance(err, torch.OutOfMemoryError):
            self._too_large.add(key)
            if not self.emulate:
                torch.cuda.empty_cache()
            line = f"attack graphs: bucket {key[0]} does not fit ({first_line(err)}); eager there"
            self.log(line)
            return
        self._disable(err)

    def _disable(self, err: RuntimeError) -> None:
        self.enabled = False
        self._captures.clear()
        self.log(f"attack graphs off: capture failed ({first_line(err)}); attacking eagerly")
