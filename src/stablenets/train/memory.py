"""Memory: the peak of this process (what the training loop logs and a training job records),
what running out of it looks like, what is free, and what a training pass's sub-steps keep.

``ActivationCost`` is the model behind ``train.max_substeps: auto``: the sub-step count of a
block grows with the square of its norm, and every sub-step keeps its activations for the
backward pass, so the memory of a pass is a sum over blocks of count x bytes per sub-step,
which the loop checks against the free memory before each forward pass; under ``remat: auto``
it also picks the blocks to checkpoint in a pass that would not fit unchecked.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import resource
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stablenets.nn.blocks import NonexpansiveBlock
from stablenets.nn.models import StableModel

__all__ = [
    "MAX_MEMORY_FRACTION",
    "device_label",
    "peak_memory_mb",
    "is_out_of_memory",
    "free_memory",
    "heap_free",
    "ActivationCost",
    "activation_cost",
]


MAX_MEMORY_FRACTION = 0.95
"""The largest ``memory_fraction`` a run may give a pass's activations (``ActivationCost``): the
rest must hold what the estimate leaves out. Measured on the CPU's allocator (a review, session
33): the paper denoiser's pass holds about 6 block inputs more (the last block's whole output,
which its channel slice keeps; the gradients in flight), 1.1 GiB at batch 5 on 321x481 images,
about 2 % of an H100's budget; the paper classifier under one (0.8). The allocator's
fragmentation comes on top."""


def device_label(device: torch.device) -> str:
    """``cpu``, or a CUDA device's index and name (``cuda:0 NVIDIA H100 80GB HBM3``)."""
    if device.type != "cuda":
        return device.type
    return f"{device} {torch.cuda.get_device_name(device)}"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB: allocated GPU memory on CUDA, the resident
    set's high-water mark (Python and torch included) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# What an allocation failure says where it is a plain RuntimeError: the CPU allocator, and CUDA
# libraries or the driver running out inside a call (cuBLAS, cuSOLVER, cuFFT, a kernel launch, a
# driver API call; torch's ATen/cuda/Exceptions.h, ATen/native/cuda/CuFFTUtils.h and
# c10/cuda/driver_api.h write these).
_OUT_OF_MEMORY = (
    "can't allocate memory",
    "CUDA error: out of memory",
    "CUDA driver error: out of memory",
    "_STATUS_ALLOC_FAILED",
    "CUFFT_ALLOC_FAILED",
)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from (its ``__cause__`` chain: a wrapper
    that re-raises an allocation failure ``from`` it hides it otherwise), is an allocation
    failure: ``torch.OutOfMemoryError`` (the CUDA caching allocator), Python's
    ``MemoryError``, or a ``RuntimeError`` (``torch.AcceleratorError`` is one) saying so
    (``_OUT_OF_MEMORY``). Not ``__context__``: an error raised while handling an allocation
    failure (a save that fails on a full disk) is that error, to be reported as itself; nor
    past a ``ValueError``, which says what was wrong with the input (damaged data whose sizes
    could not be allocated)."""
    seen: set[int] = set()
    here: BaseException | None = err
    while here is not None and id(here) not in seen:  # a chain can loop back on itself
        if isinstance(here, MemoryError | torch.OutOfMemoryError) or (
            isinstance(here, RuntimeError) and any(said in str(here) for said in _OUT_OF_MEMORY)
        ):
            return True
        seen.add(id(here))
        here = None if isinstance(here, ValueError) else here.__cause__
    return False


def free_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, where)``: what this process can still allocate. CUDA: the device's free memory
    plus what PyTorch's allocator holds unused. CPU: the least of the host's available memory,
    the address-space limit (``ulimit -v``) left and the cgroup's limit left (a container or a
    SLURM job)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + held, f"free on {device}"
    limits = [(left, "left in the cgroup") for left in _cgroup_left()]
    if "MemAvailable" in (host := _fields(Path("/proc/meminfo"))):
        limits.append((host["MemAvailable"], "available on the host"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = _fields(Path("/proc/self/status")).get("VmSize", 0)
        limits.append((soft - mapped, "left under ulimit -v"))
    return min(limits, default=(UNKNOWN_FREE, "free (no limit found)"))


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later): ``size_t`` counters."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


@functools.cache
def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    """glibc's ``mallinfo2``, or ``None`` where the C library has none (not glibc, or older)."""
    try:
        call = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    call.restype, call.argtypes = _Mallinfo2, []
    return call


def heap_free() -> int:
    """Bytes that this process's C allocator (glibc ``malloc``, which the CPU tensors come from)
    holds free: memory that freed tensors left in its heap (``mallinfo2().fordblks``, all
    arenas). The process reuses it for its next allocations, but the kernel counts it as taken
    (the resident set, ``VmSize`` under ``ulimit -v``, the cgroup's usage), so ``free_memory``
    does not include it: the CPU's counterpart of the memory CUDA's caching allocator reserved
    but does not use. 0 where the C library does not say (no glibc 2.33 or later). Walks the
    allocator's free lists (about a millisecond with thousands of fragments): called only where
    the memory free now would lower the budget of a pass (``loop.SubstepLimit.now``)."""
    call = _mallinfo2()
    return 0 if call is None else int(call().fordblks)


# What ``free_memory`` says where it finds no limit (no /proc: not Linux): the guard then stops
# nothing, as with no guard at all.
UNKNOWN_FREE = 2**62

# cgroup v2 (``0::<path>`` in /proc/self/cgroup) and v1 (``<n>:memory:<path>``): where the
# memory controller lives, its (limit, usage) files and the key of memory.stat that counts the
# page cache the kernel reclaims before it kills (in the usage, but not in the way)
_CGROUPS = {
    "v2": (Path("/sys/fs/cgroup"), ("memory.max", "memory.current", "inactive_file")),
    "v1": (
        Path("/sys/fs/cgroup/memory"),
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ),
}


def _cgroup_left(
    membership: Path = Path("/proc/self/cgroup"), cgroups: dict = _CGROUPS
) -> list[int]:
    """Memory left under each cgroup limit of this process and of the groups above it (a
    container, a SLURM job or step): limit - usage + inactive page cache, as container runtimes
    count it; "max" or a v1 "unlimited" (2**63 rounded) is no limit."""
    lefts = []
    with contextlib.suppress(OSError):
        for line in membership.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            version = (
                "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
            )
            if version is None:
                continue
            root, (limit, usage, cache) = cgroups[version]
            here = root / path.lstrip("/")
            for group in (here, *here.parents):
                if not group.is_relative_to(root):
                    break
                with contextlib.suppress(OSError, ValueError):
                    top, used = (int((group / name).read_text()) for name in (limit, usage))
                    if top < 2**60:
                        lefts.append(top - used + _stat(group / "memory.stat").get(cache, 0))
    return lefts


def _stat(path: Path) -> dict[str, int]:
    """The ``key value`` lines of a cgroup's memory.stat (empty where it is missing)."""
    with contextlib.suppress(OSError):
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    return {}


def _fields(path: Path) -> dict[str, int]:
    """The ``Name: <n> kB`` lines of a ``/proc`` file, in bytes (empty where it is missing)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[name] = int(value.split()[0]) * 1024
    return out


@dataclass(frozen=True)
class ActivationCost:
    """Bytes a training forward pass keeps for its backward pass, for the sub-step counts
    ``n_i`` of the constrained blocks at batch size ``B``, each block's sub-steps checkpointed
    (``r_i``) or not::

        bytes(n, r) = B (fixed + sum_i n_i kept_i) + sum_i n_i shared_i + transient

    ``kept_i`` is what one sub-step keeps per image: ``stages_i`` (its stages' activations), or
    ``inputs_i`` (its input alone) when checkpointed; ``shared_i``: what an unchecked sub-step
    keeps whatever the batch (tensors derived from the weights); ``fixed``: the layers outside
    the blocks, per image; ``transient``: the largest ``B stages_i + shared_i`` of the
    checkpointed blocks (``substep_bytes``), what the backward pass holds while it recomputes one
    of their sub-steps, which it does one at a time. Exact for what the model's forward pass
    saves in eager mode; ``memory_fraction`` (at most ``MAX_MEMORY_FRACTION``) leaves the rest
    free: the gradients in flight and what the loss keeps (the denoiser: about 6 block inputs
    in all, measured), and, under bf16 in a CUDA graph (no autocast cache), a cast of the
    weights per call.
    """

    stages: tuple[int, ...]
    inputs: tuple[int, ...]
    shared: tuple[int, ...]
    checkpointable: tuple[bool, ...]  # False: the block never checkpoints (CPL)
    fixed: int
    batch: int

    def bytes(self, counts: Sequence[int], remat: Sequence[bool]) -> int:
        blocks = [
            self.block_bytes(i, n, r) for i, (n, r) in enumerate(zip(counts, remat, strict=True))
        ]
        transient = max(
            (self.substep_bytes(i) for i, r in enumerate(remat) if r and self.checkpointable[i]),
            default=0,
        )
        return self.batch * self.fixed + transient + sum(blocks)

    def substep_bytes(self, i: int) -> int:
        """What one unchecked sub-step of block ``i`` keeps: its activations and its tensors
        derived from the weights; also what the backward pass holds while it recomputes one
        checkpointed sub-step."""
        return self.batch * self.stages[i] + self.shared[i]

    def block_bytes(self, i: int, count: int, remat: bool) -> int:
        """What ``count`` sub-steps of block ``i`` keep, checkpointed (``remat``) or not."""
        if remat and self.checkpointable[i]:
            return count * self.batch * self.inputs[i]
        return count * self.substep_bytes(i)

    def cheapest_remat(self, counts: Sequence[int], budget: int) -> list[bool] | None:
        """The blocks to checkpoint so that a pass at ``counts`` keeps at most ``budget`` bytes
        with the fewest sub-steps run again (the backward pass recomputes a checkpointed
        block's sub-steps): none where the pass fits unchecked, ``None`` where nothing fits.

        With ``S`` the checkpointed blocks and ``f_i`` what checkpointing block ``i`` frees,
        ``bytes = unchecked - sum_{i in S} f_i + max_{i in S} substep_bytes(i)``. For each level
        ``t`` of the last term this is a 0/1 knapsack over the blocks with ``substep_bytes(i) <=
        t``: the fewest sub-steps freeing at least ``unchecked + t - budget``, exact by dynamic
        programming over the sub-step total (``_frees``, cached for the last counts); the
        cheapest level wins. That program takes time and memory in proportion to the sub-step
        total, which a runaway norm makes huge (1.5 million sub-steps: seconds and hundreds of
        MiB) just when nothing fits: ``None`` comes first, without it, where even the best case
        (every block that frees memory checkpointed, at the lowest level) keeps more than
        ``budget``."""
        unchecked = self.bytes(counts, [False] * len(counts))
        if unchecked <= budget:
            return [False] * len(counts)
        if self._fewest_bytes(counts, unchecked) > budget:
            return None
        best: tuple[int, int] | None = None  # (sub-steps run again, blocks as a bit mask)
        for level, table in _frees(self, tuple(counts)):
            need = unchecked + level - budget
            steps = next((s for s, (freed, _) in enumerate(table) if freed >= need), None)
            if steps is not None and (best is None or steps < best[0]):
                best = (steps, table[steps][1])
        return None if best is None else [bool(best[1] >> i & 1) for i in range(len(counts))]

    def _fewest_bytes(self, counts: Sequence[int], unchecked: int) -> int:
        """A lower bound of what any checkpointing keeps at ``counts`` (``unchecked``: none):
        ``unchecked - sum_i f_i + min_i substep_bytes(i)`` over the checkpointable blocks,
        ``f_i > 0`` in the sum (no choice frees more, nor holds less while it recomputes than
        the smallest block's sub-step); ``unchecked`` where no block can be checkpointed."""
        frees = [
            self.block_bytes(i, n, False) - self.block_bytes(i, n, True)
            for i, n in enumerate(counts)
            if self.checkpointable[i]
        ]
        if not frees:
            return unchecked
        level = min(self.substep_bytes(i) for i, c in enumerate(self.checkpointable) if c)
        return unchecked - sum(f for f in frees if f > 0) + level


@functools.lru_cache(maxsize=2)
def _frees(
    cost: ActivationCost, counts: tuple[int, ...]
) -> list[tuple[int, list[tuple[int, int]]]]:
    """For each level ``t`` of the checkpointable blocks' ``substep_bytes``: ``table[s]``, the
    most bytes that checkpointing blocks with ``substep_bytes <= t`` and at most ``s`` sub-steps
    in all frees, and which blocks (a bit mask)."""
    out = []
    held = [cost.substep_bytes(i) for i in range(len(counts))]
    for level in sorted({h for h, c in zip(held, cost.checkpointable, strict=True) if c}):
        table = [(0, 0)] * (sum(counts) + 1)
        for i, n in enumerate(counts):
            freed = cost.block_bytes(i, n, False) - cost.block_bytes(i, n, True)
            if not cost.checkpointable[i] or held[i] > level or freed <= 0:
                continue
            for s in range(len(table) - 1, n - 1, -1):  # each block once: from the top down
                if (more := table[s - n][0] + freed) > table[s][0]:
                    table[s] = (more, table[s - n][1] | 1 << i)
        out.append((level, table))
    return out


def activation_cost(
    model: StableModel,
    inputs: torch.Tensor,
    batch: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> ActivationCost:
    """Measure ``model``'s ``ActivationCost`` at training batch ``batch`` from one sample
    ``inputs[:1]`` (the training pass's image size and layout), by counting the bytes autograd
    saves (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, storages counted
    once): one sub-step of each block on one and two images (the difference is per image), and
    one pass on one image for the layers outside the blocks, whose sub-steps save nothing
    then. Runs in ``train()`` mode under ``autocast`` (the training pass's precision)."""
    blocks = list(model.constrained_blocks())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    block_inputs: dict[int, torch.Tensor] = {}
    inside = [False]

    def enter(i: int) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            block_inputs[i], inside[0] = args[0].detach().clone(), True

        return hook

    hooks = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    hooks += [b.register_forward_hook(lambda *_: inside.__setitem__(0, False)) for b in blocks]
    with _unchanged(model):
        try:
            fixed = _saved_bytes(
                lambda: model.train()(inputs[:1].clone()), params, autocast, skip=lambda: inside[0]
            )
        finally:
            for hook in hooks:
                hook.remove()
        saves = [[_substep_saves(b, block_inputs[i], n, params, autocast) for n in (1, 2)]
                 for i, b in enumerate(blocks)]  # fmt: skip
    stages = [two - one for one, two in saves]
    return ActivationCost(
        stages=tuple(stages),
        inputs=tuple(
            block_inputs[i].numel() * block_inputs[i].element_size() for i in range(len(blocks))
        ),
        shared=tuple(max(one - stage, 0) for (one, _), stage in zip(saves, stages, strict=True)),
        checkpointable=tuple(b.checkpointable for b in blocks),
        fixed=fixed,
        batch=batch,
    )


@contextlib.contextmanager
def _unchanged(model: StableModel) -> Iterator[None]:
    """The model's mode and buffers as they were (a probe pass in ``train()`` mode would move a
    batch norm's running statistics, and so the trained numbers)."""
    mode, buffers = model.training, [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        model.train(mode)
        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)


def _substep_saves(
    block: NonexpansiveBlock,
    x: torch.Tensor,
    n: int,
    params: set[int],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> int:
    """What one sub-step of ``block`` saves on ``n`` copies of the one image ``x`` (a leaf that
    requires a gradient, as a pass's input does)."""
    images = x.repeat(n, *[1] * (x.dim() - 1)).requires_grad_()
    _, h = block.schedule(x)
    return _saved_bytes(lambda: block._substep(images, h), params, autocast)


def _saved_bytes(
    run: Callable[[], object],
    params: set[int],
    autocast: Callable[[], contextlib.AbstractContextManager],
    skip: Callable[[], bool] = lambda: False,
) -> int:
    """Bytes of the tensors autograd saves while ``run`` runs, parameters excluded, each
    storage once; tensors saved while ``skip()`` holds are not counted. ``run``'s graph keeps
    none of them: it cannot be differentiated."""
    kept: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> None:
        # ``kept`` holds each storage (not its tensor, whose graph would hold this hook: a
        # cycle the garbage collector cannot see) until counted, so no address is reused
        # meanwhile; the graph holds nothing (no backward pass follows).
        storage = t.untyped_storage()
        if not skip() and storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        run()
    return sum(storage.nbytes() for storage in kept.values())
