"""app_engine/data/prefetch.py: batches gathered ahead by a thread are the batches ``x[idx]``, in
order; errors surface at their batch; closing early stops the thread; on CUDA the pinned buffers
and the side stream never hand a step a batch that is not (yet, or any more) its own.

The thread's logic runs on the CPU here (``depth`` > 0 forces it); the tests marked ``cuda`` run
the pinned-memory path on a GPU and skip elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from app_engine.data.disk_cache import DataOptions, decoded_array
from app_engine.data.prefetch import CUDA_DEPTH, THREAD_NAME, default_depth, device_batches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
CPU = torch.device("cpu")


def mapped_set(tmp_path: Path, n: int = 300, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [n, 3, size, size] over a memory-mapped decoded file (as a streamed set's),
    labels [n] in memory; every image differs from every other."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)

    def fill(out: np.ndarray) -> None:
        out[:] = pixels

    arr = decoded_array(DataOptions(memory_cap_bytes=0, cache_dir=tmp_path), tmp_path, "k", pixels.shape, fill)
    return torch.from_numpy(arr), torch.from_numpy(rng.integers(0, 10, n))


def epoch_batches(n: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """A shuffled epoch cut into batches, the last one shorter (as the training loop cuts it)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_are_x_idx_in_order(tmp_path: Path, depth: int) -> None:
    x, y = mapped_set(tmp_path)
    batches = epoch_batches(len(y), 32)
    got = list(device_batches(x, y, batches, CPU, depth=depth))
    assert len(got) == len(batches) == 10 and len(got[-1][1]) == 300 - 9 * 32
    for (xb, yb), idx in zip(got, batches, strict=True):
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        assert xb.dtype == torch.uint8 and yb.dtype == torch.int64
    # Every batch is its own tensor: keeping all of them (above) shows none was overwritten.
    assert prefetch_threads() == []


def test_the_default_gathers_in_line_except_host_data_on_cuda() -> None:
    x = torch.zeros(4, 3)
    assert default_depth(x, CPU) == 0
    assert default_depth(x, torch.device("cuda")) == CUDA_DEPTH
    assert default_depth(x.to("meta"), torch.device("meta")) == 0  # data already on the device
    with pytest.raises(ValueError, match="depth must be >= 0"):
        device_batches(x, torch.zeros(4), [], CPU, depth=-1)


def test_an_error_surfaces_at_its_batch_and_the_thread_ends(tmp_path: Path) -> None:
    x, y = mapped_set(tmp_path, n=100)
    batches = epoch_batches(100, 10)
    batches[4] = torch.tensor([0, 1, 100])  # out of range: raised by x[idx] in the thread
    seen = []
    with pytest.raises(IndexError, match="out of bounds"):
        for xb, _ in device_batches(x, y, batches, CPU, depth=2):
            seen.append(xb)
    assert [torch.equal(xb, x[idx]) for xb, idx in zip(seen, batches, strict=False)] == [True] * 4
    assert len(seen) == 4 and prefetch_threads() == []


def test_leaving_early_stops_the_thread_and_it_never_runs_far_ahead(tmp_path: Path) -> None:
    x, y = mapped_set(tmp_path, n=200)
    taken: list[int] = []

    def counted() -> Iterator[torch.Tensor]:
        for k, idx in enumerate(epoch_batches(200, 4)):  # 50 batches
            taken.append(k)
            yield idx

    depth = 2
    stream = device_batches(x, y, counted(), CPU, depth=depth)
    for step, _ in enumerate(stream):
        if step == 2:
            break
    stream.close()  # what contextlib.closing around the loop does (or dropping the generator)
    assert prefetch_threads() == []
    # 3 batches used, at most `depth` waiting in the queue and one more being handed over.
    assert 3 <= len(taken) <= 3 + depth + 1, taken


def test_training_on_prefetched_batches_gives_the_same_model(tmp_path: Path) -> None:
    """A few SGD steps on batches gathered ahead and on batches gathered in line: the same weights,
    bit for bit (what keeps a streamed run's metrics equal to an in-memory run's)."""
    x, y = mapped_set(tmp_path, n=120)
    batches = epoch_batches(120, 16)

    def train(depth: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 10))
        for xb, yb in device_batches(x, y, batches, CPU, depth=depth):
            loss = torch.nn.functional.cross_entropy(model(xb.float() / 255), yb)
            model.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():  # plain SGD (torch.optim's first use costs seconds of imports)
                for p in model.parameters():
                    assert p.grad is not None
                    p.sub_(0.1 * p.grad)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(0), train(2))


# --------------------------------------------------------------------------------------------------
# CUDA: pinned buffers, a side stream, events


@pytest.mark.cuda
@needs_cuda
def test_cuda_batches_from_pinned_buffers_are_x_idx(tmp_path: Path) -> None:
    """Many more batches than pinned slots, all kept alive, with device work between them: a buffer
    refilled too early or a batch's memory reused too early would change a kept batch."""
    x, y = mapped_set(tmp_path, n=600, size=16)
    cuda = torch.device("cuda")
    batches = epoch_batches(600, 24)
    kept = []
    weights = torch.randn(3 * 16 * 16, 3 * 16 * 16, device=cuda)
    for xb, yb in device_batches(x, y, batches, cuda):
        assert xb.device.type == "cuda" and yb.device.type == "cuda"
        # A slow step on the training stream while the thread copies the next batches.
        for _ in range(5):
            (xb.flatten(1).float() @ weights).sum().item()
        kept.append((xb, yb))
    torch.cuda.synchronize()
    assert len(kept) == len(batches)
    for (xb, yb), idx in zip(kept, batches, strict=True):
        assert torch.equal(xb.cpu(), x[idx]) and torch.equal(yb.cpu(), y[idx])
    assert prefetch_threads() == []


@pytest.mark.cuda
@needs_cuda
def test_cuda_batches_used_and_dropped_at_once(tmp_path: Path) -> None:
    """The training loop's pattern: each batch used by a kernel, then dropped (its memory returns
    to the allocator while the side stream copies); the checksums match the host's."""
    x, y = mapped_set(tmp_path, n=600, size=16)
    batches = epoch_batches(600, 24, seed=1)
    sums = [int(xb.sum()) + int(yb.sum()) for xb, yb in device_batches(x, y, batches, torch.device("cuda"))]
    assert sums == [int(x[idx].sum()) + int(y[idx].sum()) for idx in batches]
    errors = iter(batches[:3] + [torch.tensor([600])])
    with pytest.raises(IndexError):
        for _ in device_batches(x, y, errors, torch.device("cuda")):
            pass
    assert prefetch_threads() == []
