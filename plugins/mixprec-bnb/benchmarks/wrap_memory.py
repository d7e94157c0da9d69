"""Peak memory of quantizing a model to nf4-dq with ``wrap`` and with ``init_module``.

    python plugins/mixprec-bnb/benchmarks/wrap_memory.py                 # >= 50 M parameters
    python plugins/mixprec-bnb/benchmarks/wrap_memory.py --dim 256 --layers 2   # smoke run

The model is a stack of residual MLP blocks (LayerNorm, Linear dim->4*dim,
Linear 4*dim->dim): ``8 * dim**2 * layers`` Linear weights (dim 1024, 6 layers:
50.4 M parameters). Each variant runs in a fresh process and reports its peak
resident memory above the process's baseline (after imports), against the
issue's bound: the fp32 size of the model plus its largest Linear layer.

Why RSS and not tracemalloc: tracemalloc sees only Python's allocator, while
torch allocates tensor storage with its own C++ allocator. The peak is read
from ``VmHWM`` after resetting it (``/proc/self/clear_refs``), so it covers
exactly the measured step. glibc's adaptive mmap threshold would keep freed
tensors in the heap and inflate RSS; children run with a fixed threshold
(``MALLOC_MMAP_THRESHOLD_``) so large tensors are returned to the OS on free.

Variants:

- ``fp32 build``: build the fp32 model (the reference point).
- ``wrap``: build fp32, then ``mixprec.wrap(model, mode="nf4-dq")``; the
  measured peak is the model plus everything ``wrap`` allocates. ``wrap`` is
  atomic: it keeps the replaced fp32 weights referenced until it returns so
  that it can restore them if anything fails, so its peak is the fp32 model
  plus the whole quantized copy plus one layer's temporaries.
- ``init_module``: build inside ``mixprec.init_module("nf4-dq")`` (each Linear
  quantized as it is created).

Quantization runs a chunk of 2**18 weights at a time (bitsandbytes' CPU path
copies its input several times), so one layer's temporaries stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

MB = 2**20


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _model(dim: int, layers: int) -> Any:
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(dim)
            self.up = torch.nn.Linear(dim, 4 * dim)
            self.down = torch.nn.Linear(4 * dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    return torch.nn.Sequential(*[Block() for _ in range(layers)])


def child(variant: str, dim: int, layers: int) -> dict[str, Any]:
    import warnings

    import torch

    import mixprec

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    with torch.no_grad():  # load bitsandbytes and warm its kernels on a tiny layer first
        tiny = mixprec.wrap(torch.nn.Sequential(torch.nn.Linear(64, 64)), mode="nf4-dq")
        tiny(torch.randn(1, 64))
    del tiny
    base, _ = _rss()
    _reset_peak()
    if variant == "fp32 build":
        model = _model(dim, layers)
    elif variant == "wrap":
        model = _model(dim, layers)
        built, _ = _rss()
        _reset_peak()
        model = mixprec.wrap(model, mode="nf4-dq")
    elif variant == "init_module":
        with mixprec.init_module("nf4-dq"):
            model = _model(dim, layers)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    _, peak = _rss()
    after, _ = _rss()
    fp32 = sum(p.numel() for p in _model_shapes(dim, layers)) * 4
    out = {"variant": variant, "peak": peak - base, "after": after - base, "fp32": fp32,
           "layer": 4 * dim * dim * 4}
    if variant == "wrap":
        out["before"] = built - base
    return out


def _model_shapes(dim: int, layers: int) -> list[Any]:
    import torch

    with torch.device("meta"):
        return list(_model(dim, layers).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dim, args.layers)))
        return

    n_params = sum(p.numel() for p in _model_shapes(args.dim, args.layers))
    print(f"model: {args.layers} blocks, dim {args.dim}: {n_params / 1e6:.1f} M parameters")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    rows = []
    for variant in ("fp32 build", "wrap", "init_module"):
        cmd = [sys.executable, __file__, "--child", variant, "--dim", str(args.dim),
               "--layers", str(args.layers)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"variant {variant!r} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    fp32, layer = rows[0]["fp32"], rows[0]["layer"]
    bound, bound_block = fp32 + layer, fp32 + 2 * layer
    print(f"fp32 size {fp32 / MB:.1f} MiB; largest Linear {layer / MB:.1f} MiB; one block "
          f"(two Linears) {2 * layer / MB:.1f} MiB. Memory is counted above the baseline "
          "after imports.")
    print(f"{'variant':<12} {'peak MiB':>9} {'after MiB':>10}  {'<= fp32+Linear':>14}"
          f"  {'<= fp32+block':>13}")
    for row in rows:
        ok = "yes" if row["peak"] <= bound else "NO"
        ok_block = "yes" if row["peak"] <= bound_block else "NO"
        print(f"{row['variant']:<12} {row['peak'] / MB:>9.1f} {row['after'] / MB:>10.1f}  "
              f"{ok:>14}  {ok_block:>13}")
    wrap = next(r for r in rows if r["variant"] == "wrap")
    print(f"wrap: the fp32 model held {wrap['before'] / MB:.1f} MiB before wrap; wrap's peak "
          f"adds {(wrap['peak'] - wrap['before']) / MB:.1f} MiB (the quantized copy and one "
          "layer's temporaries: the fp32 weights are released when wrap returns)")


if __name__ == "__main__":
    main()
