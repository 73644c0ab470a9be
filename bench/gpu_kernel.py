"""`livekv bench gpu`, part kernel: the Triton rotation kernel against the torch path and the
fp64 reference, on the embedded model's cache shape (30 layers x 3 kv heads x T x 64).

Accuracy: mixed deltas (zeros among them, which must keep their bits) at positions far from 0,
each path's output against kernels.rerotate_keys_reference. Bandwidth: every key moved (an edit
at the top of the file), bytes of keys read + written over the median CUDA-event time; the small
cos/sin tables each call builds are timed but not counted. Small caches fit in L2, so each call
takes the next of enough buffer copies to span several times the L2.
"""
from __future__ import annotations

import itertools

import torch

from livekv import kernels
from livekv.bench.kernel import HEAD_DIM, KV_HEADS, LAYERS, SHIFT, THETA

TOKENS = (1024, 4096, 16384, 65536)
DRY = dict(layers=2, kv_heads=2, head_dim=16, tokens=(64, 200))
SPAN_BYTES = 256 << 20  # buffers each timed path cycles through, at least: several L2s


def accuracy(k, delta, inv, pos, path) -> tuple[float, float, bool]:
    """(max |out - ref|, ||out - ref|| / ||ref||, whether zero-delta keys kept their bits)."""
    ref = kernels.rerotate_keys_reference(k, delta, inv, positions=pos)    # fp64, (L, Hkv, T, D)
    out = path(k.clone(), delta, inv, positions=pos)
    diff = out.double() - ref
    still = delta == 0
    kept = bool(torch.equal(out[:, :, still], k[:, :, still]))
    return diff.abs().max().item(), (diff.norm() / ref.norm()).item(), kept


def copy_gbs(bench, nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=bench.device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench.median_ms(lambda: dst.copy_(src)) * 1e6)


def run(bench, rows: list, notes: list) -> None:
    dev = bench.device
    if dev == "cuda" and not kernels.HAS_TRITON:
        raise RuntimeError("triton is not installed here: the kernel part times the Triton path; install triton")
    L, H, D, tokens = ((DRY["layers"], DRY["kv_heads"], DRY["head_dim"], DRY["tokens"]) if bench.dry
                       else (LAYERS, KV_HEADS, HEAD_DIM, TOKENS))
    inv = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D))
    paths = {"triton": kernels.rerotate_keys_triton_, "torch": kernels.rerotate_keys_torch_}
    copy = copy_gbs(bench, (64 << 20) if bench.dry else (1 << 30))
    notes.append(f"copy_ (read + write) on {dev}: {copy:,.0f} GB/s; % of copy_ is each path's GB/s against it")
    notes.append(f"keys (L={L}, Hkv={H}, T, D={D}); error against the fp64 reference, mixed deltas at positions "
                 f"10^5 + t; bandwidth with every key moved by {SHIFT}")
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype, T in itertools.product((torch.float32, torch.bfloat16), tokens):
        k = torch.randn(L, H, T, D, generator=g).to(dev, dtype)             # (L, Hkv, T, D)
        pos = (100_000 + torch.arange(T)).to(dev)
        mixed = torch.randint(-64, 65, (T,), generator=g)
        mixed[::7] = 0
        mixed = mixed.to(dev)
        nbytes = 2 * k.numel() * k.element_size()  # each key read once and written once
        copies = [k] + [k.clone() for _ in range(max(0, -(-SPAN_BYTES // nbytes) - 1))]
        shift = torch.full((T,), SHIFT, device=dev)
        for name, fn in paths.items():
            err, rel, kept = accuracy(k, mixed, inv, pos, fn)
            bufs = itertools.cycle(copies)
            ms = bench.median_ms(lambda: fn(next(bufs), shift, inv, positions=pos))
            gbs = nbytes / (ms * 1e6)
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), tokens=T, MB=round(nbytes / 1e6, 1), path=name,
                             max_abs_err=err, rel_err=rel, zero_delta_bits_kept=kept, ms=ms, GB_s=gbs,
                             pct_of_copy=round(100 * gbs / copy, 1)))
        del k, copies
        if dev == "cuda":
            torch.cuda.empty_cache()
