"""How fast can a step's gradients be read in place? Kernels for the per-step gradient norm, after a real backward.

Not a test: a micro-benchmark behind "Where the floor comes from" in BENCHMARKS.md. The benchmark MLP
(784-512-512-10, batch 128, Adam; ``run.py``'s ``mlp``) trains on one batch; every iteration runs every variant once,
in order: a backward, the variant over the fresh gradients (timed, values read on the host), then Adam's step. The
medians show what reading the gradients costs where the per-step check reads them, with the caches as the backward
and the previous step left them. ``... x2`` variants run their kernel twice and time both: the second pass reads
bytes the first brought into cache.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grad_read.py --iterations 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Variant = Callable[[list[Tensor]], list[Tensor]]


def _rows(width: int) -> Variant:
    def norms(grads: list[Tensor]) -> list[Tensor]:
        out = []
        for g in grads:
            if g.numel() % width == 0 and g.numel() >= 4 * width:  # per-row norms, then the norm of those
                out.append(torch.linalg.vector_norm(torch.linalg.vector_norm(g.view(-1, width), dim=1)))
            else:
                out.append(torch.linalg.vector_norm(g))
        return out

    return norms


VARIANTS: dict[str, Variant] = {
    "nothing": lambda grads: [],
    "torch._foreach_norm": lambda grads: list(torch._foreach_norm(grads)),
    "linalg.vector_norm each": lambda grads: [torch.linalg.vector_norm(g) for g in grads],
    "sum each (no norm: a plain read)": lambda grads: [g.sum() for g in grads],
    "vdot(g, g) each": lambda grads: [torch.vdot(g.view(-1), g.view(-1)) for g in grads],
    "aminmax each (no norm)": lambda grads: [torch.aminmax(g)[0] for g in grads],
    "row norms of (-1, 1024), then their norm": _rows(1024),
    "einsum('i,i->') each": lambda grads: [torch.einsum("i,i->", g.view(-1), g.view(-1)) for g in grads],
    "square().sum() each (a temporary)": lambda grads: [g.square().sum() for g in grads],
    "torch._foreach_norm x2": lambda grads: [*torch._foreach_norm(grads), *torch._foreach_norm(grads)],
    "sum each x2": lambda grads: [g.sum() for g in grads] + [g.sum() for g in grads],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs, targets = torch.randn(128, 784), torch.randint(0, 10, (128,))
    params = list(model.parameters())
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.iterations):
        for name, variant in VARIANTS.items():
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            grads = [p.grad for p in params if p.grad is not None]
            start = time.perf_counter()
            with torch.no_grad():
                values = [t.item() for t in variant(grads)]
            times[name].append(1e6 * (time.perf_counter() - start))
            optimizer.step()
            del values
    size = sum(p.numel() * p.element_size() for p in params)
    print(f"{len(params)} gradients, {size / 2**20:.1f} MiB, {args.iterations} iterations, {args.threads} thread(s)")
    print("| variant | median us | p10-p90 us |\n| --- | --- | --- |")
    for name, values in times.items():
        deciles = statistics.quantiles(values, n=10)
        print(f"| {name} | {statistics.median(values):.0f} | {deciles[0]:.0f}-{deciles[-1]:.0f} |")


if __name__ == "__main__":
    main()
