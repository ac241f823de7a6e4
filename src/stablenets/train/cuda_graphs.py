"""CUDA graphs of a training step's forward and backward, one per tuple of sub-step counts.

A training step of the paper's classifier launches hundreds of small kernels (15 blocks, 15 or
more sub-steps, each a convolution, an activation and a transposed convolution, forward and
backward). At batch 128 on 32x32 images the host (Python, autograd, the launches) takes longer
than the kernels (H100 profile: 21.5 ms against 6.9 ms per step). A CUDA graph replays the whole
forward and backward with one launch.

A graph freezes every value the host computed while it was captured: each block's sub-step count
``n``, step size ``h = T / n`` and checkpointing. So there is one graph per tuple of
``(n, T / n)`` and of checkpointing over the constrained blocks (and per input shape), looked
up after the step's power iteration has set the
counts. CPL's step follows the norm estimate at every step; while captured it reads that estimate
from the device (``CPLBlock.device_step_size``), so one graph serves every step.

Policy:

* a tuple is captured the second time it is seen: counts seen once (while the norms grow through
  a threshold) run eagerly, on a side stream, which also warms up cuDNN and the autograd engine;
* at most ``cache`` graphs are kept (the least recently used is dropped);
* the graphs share one memory pool: a replay may overwrite another graph's outputs, never its own,
  and only the outputs of the graph just replayed are read (static inputs live outside the pool);
* a capture that fails (a layer that synchronises with the host inside its forward) turns graphs
  off for the run, with a log line; training goes on eagerly with the same results. So does a
  step the pool's memory would not leave room for (``loop._check_substeps``).

The power iteration before each step (``operators.fused_power_iteration``: no host value, one
shape) is captured once too, on its second call; its estimates then reach the host in the one
synchronisation a step needs to choose its counts. The optimiser step and the batch stay eager
(a few kernels each).

``capture_s`` sums the seconds spent capturing (failed captures included): one-off work that the
training loop counts as start-up (``RunState.startup_s``), not as a step's time, so that a cost
projection does not extrapolate it to every step of the paper's schedule.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from stablenets.errors import first_line
from stablenets.nn.blocks import NonexpansiveBlock
from stablenets.nn.operators import FusedEstimates, LinearOperator, fused_power_iteration

__all__ = ["StepGraphs", "substep_key"]

T = TypeVar("T")
ForwardLoss = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


def substep_key(model: nn.Module) -> tuple[tuple[int, float], ...]:
    """``(n, T / n)`` of every constrained block at its current (training) norm estimate
    (``NonexpansiveBlock.schedule``, which also records the per-step diagnostics that a replay,
    running no Python code, would otherwise leave stale)."""
    return tuple(b.schedule() for b in model.modules() if isinstance(b, NonexpansiveBlock))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor
    targets: torch.Tensor
    out: torch.Tensor
    loss: torch.Tensor
    grads: list[torch.Tensor | None]


class StepGraphs:
    """Forward, loss and backward of ``model``, replayed from CUDA graphs where possible.

    ``forward_loss(inputs, targets, capturing)`` computes ``(out, loss)``; it is called eagerly
    and under capture (``capturing=True``: no autocast weight cache). Calling the object leaves
    the gradients in every parameter's ``.grad``, as ``loss.backward()`` after ``zero_grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        forward_loss: ForwardLoss,
        cache: int = 8,
        log: Callable[[str], None] = print,
    ) -> None:
        if cache < 1:
            raise ValueError(f"cuda_graph_cache={cache} must be at least 1")
        self.model, self.forward_loss, self.cache, self.log = model, forward_loss, cache, log
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._blocks = [b for b in model.modules() if isinstance(b, NonexpansiveBlock)]
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream()
        self.enabled, self.off = True, ""
        self.captures = self.replays = self.eager_steps = 0
        self.capture_s = 0.0  # seconds spent capturing (``_capture_graph``), failures included
        # the most bytes a pass captured into the shared pool kept (the training loop prices
        # them): the pool keeps its blocks until every graph sharing it is gone, so a graph
        # evicted from the cache leaves its memory reserved there, for captures only
        self.pool_peak = 0
        self._norms: dict[tuple, tuple[torch.cuda.CUDAGraph | None, FusedEstimates]] = {}

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(inputs.shape), inputs.stride(), inputs.dtype, substep_key(self.model),
               tuple(b.checkpoint_substeps for b in self._blocks))  # fmt: skip
        entry = self._graphs.get(key)
        if entry is None and self.enabled and key in self._seen:
            entry = self._capture(key, inputs, targets)
        if entry is None:
            self._seen.add(key)
            return self._eager(inputs, targets)
        self._graphs.move_to_end(key)
        entry.inputs.copy_(inputs)
        entry.targets.copy_(targets)
        for p, g in zip(self.params, entry.grads, strict=True):
            p.grad = g
        entry.graph.replay()
        self.replays += 1
        return entry.out, entry.loss

    def launch_power_iteration(
        self, operators: list[LinearOperator], n_iters: int
    ) -> FusedEstimates:
        """``operators.fused_power_iteration`` (its device work, queued), replayed from a graph
        from the second call on; ``remember_estimates(*result)`` brings the estimates over."""
        key = (n_iters, tuple(id(op) for op in operators))
        graph, result = self._norms.get(key, (None, None))
        if graph is None and result is not None and self.enabled:  # second call: capture
            captured = self._capture_graph(lambda: fused_power_iteration(operators, n_iters))
            if captured is not None:
                graph, result = captured
        if graph is None or result is None:  # (a graph always comes with its result)
            result = self._side(lambda: fused_power_iteration(operators, n_iters))
        else:
            graph.replay()
        self._norms[key] = (graph, result)
        return result

    def captured_passes(self) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
        """The sub-step counts and checkpointing of the graphs kept: their passes' activations
        live in the pool (one pool: as large as the largest), beside what an eager step
        allocates."""
        return [(tuple(n for n, _ in key[3]), tuple(map(bool, key[4]))) for key in self._graphs]

    def turn_off(self, why: str, short: str, release: bool = True) -> None:
        """Train eagerly from now on, the graphs dropped, with a log line; their memory pool
        given back (``release``: a pass that needs the pool's memory), not after a capture that
        failed (the allocator may still count it as under way, and refuse or assert)."""
        self.enabled, self.off = False, short
        self._graphs.clear()
        self._norms.clear()
        self._zero_grad()
        if release:
            torch.cuda.empty_cache()
        self.log(f"cuda graphs off for this run: {why}; training eagerly")

    def summary(self) -> str:
        state = "on" if self.enabled else f"off ({self.off})"
        return (
            f"cuda graphs {state}: {self.captures} captured, {self.replays} steps replayed, "
            f"{self.eager_steps} eager"
        )

    def _zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _side(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a side stream, ordered with the current one: how work runs before its
        capture (lazy initialisations must not happen inside one)."""
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            result = fn()
        torch.cuda.current_stream().wait_stream(self._stream)
        return result

    def _capture_graph(self, fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T] | None:
        """``(graph, fn's outputs)`` with ``fn`` captured, or ``None`` (graphs off, logged)."""
        torch.cuda.synchronize()  # the work queued before (the step's) is not the capture's
        t0 = time.perf_counter()  # (``torch.cuda.graph`` synchronises on entry too)
        graph, before = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                result = fn()
        except RuntimeError as err:
            torch.cuda.set_stream(before)  # a capture that fails at its end leaves its stream on
            self.turn_off(f"capture failed ({first_line(err)})", "capture failed", release=False)
            return None
        finally:
            self.capture_s += time.perf_counter() - t0
        return graph, result

    def _forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, capturing: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, loss = self.forward_loss(inputs, targets, capturing)
        loss.backward()
        return out.detach(), loss.detach()

    def _eager(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step without a graph."""
        self._zero_grad()
        self.eager_steps += 1
        return self._side(lambda: self._forward_backward(inputs, targets, False))

    def _capture(self, key: tuple, inputs: torch.Tensor, targets: torch.Tensor) -> _Graph | None:
        static_in, static_tgt = inputs.clone(), targets.clone()
        self._zero_grad()
        captured = self._capture_graph(lambda: self._forward_backward(static_in, static_tgt, True))
        if captured is None:
            return None
        graph, (out, loss) = captured
        entry = _Graph(graph, static_in, static_tgt, out, loss, [p.grad for p in self.params])
        self._graphs[key] = entry
        while len(self._graphs) > self.cache:
            self._graphs.popitem(last=False)
        self.captures += 1
        return entry
