"""Key re-rotation throughput on the embedded model's cache shape.

    livekv bench kernel [--quick]

One (L, Hkv, T, D) key buffer holding every layer (30 x 3 x T x 64); an edit at
the top of the file shifts all T tokens, the worst case. Effective bandwidth =
bytes of keys read + written / time (the small cos/sin table is not counted,
its construction is timed). CPU (fp32): the torch path against a naive
per-layer rebuild with torch.cat. CUDA (bf16): the Triton kernel against the
torch path and the device's copy_ bandwidth.
"""

import argparse
import sys
import time

import torch

from livekv import kernels
from livekv.incremental.host_memory import keep_freed_memory

LAYERS, KV_HEADS, HEAD_DIM, THETA = 30, 3, 64, 10000.0
SHIFT = 5  # tokens inserted above everything


def naive_rerotate(k, delta, inv_freq, positions):
    """What an engine without the kernel does: per layer, re-encode the moved keys from the
    HF-style cos/sin of old and new positions and rebuild the layer tensor with torch.cat."""
    half = k.shape[-1] // 2
    out = []
    for layer in k.unbind(0):  # (Hkv, T, D)
        old = positions.float()[:, None] * inv_freq  # (T, D/2)
        ang = (positions + delta).float()[:, None] * inv_freq - old
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = layer[..., :half].float(), layer[..., half:].float()
        out.append(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(k.dtype))
    return out


def timeit(fn, device, min_time=0.5, max_reps=50):
    """Fastest seconds per call after a warmup, over >= 5 reps or min_time.

    The minimum, not the median: on a shared machine the noise only ever adds time.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    while len(times) < max_reps and (len(times) < 5 or sum(times) < min_time):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(device, nbytes=1 << 30):
    """Measured device-memory bandwidth of a plain copy_ (bytes read + written / s)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device)
    return 2 * nbytes / t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="livekv bench kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (1k, 4k tokens)")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        keep_freed_memory()  # as Engine.load does: both paths then reuse their temporaries
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    inv = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=device) / HEAD_DIM))
    print(f"# key re-rotation, {LAYERS} layers x {KV_HEADS} kv heads x head_dim {HEAD_DIM}, "
          f"{str(dtype).removeprefix('torch.')} on {device} ({torch.get_num_threads()} threads)\n")

    copy_bw = copy_bandwidth(device, (1 << 30) if device == "cuda" else (1 << 28))
    print(f"copy_ bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s\n")
    if device == "cuda":
        paths = [("triton", kernels.rerotate_keys_triton_), ("torch", kernels.rerotate_keys_torch_)]
        print("| tokens | MB moved | path | ms | GB/s | % of copy_ |")
        print("|---:|---:|---|---:|---:|---:|")
    else:
        paths = [("torch (all layers)", kernels.rerotate_keys_torch_), ("naive cat (per layer)", None)]
        print("| tokens | MB moved | path | ms | GB/s | speedup vs naive |")
        print("|---:|---:|---|---:|---:|---:|")

    for T in sizes:
        k = torch.randn(LAYERS, KV_HEADS, T, HEAD_DIM, device=device).to(dtype)  # (L, Hkv, T, D)
        pos = torch.arange(T, device=device)
        delta = torch.full((T,), SHIFT, device=device)
        nbytes = 2 * k.numel() * k.element_size()  # each key read once, written once
        results = []
        for name, fn in paths:
            if fn is None:
                t = timeit(lambda: naive_rerotate(k, delta, inv, pos), device)
            else:
                t = timeit(lambda: fn(k, delta, inv, positions=pos), device)
            results.append((name, t))
        for name, t in results:
            bw = nbytes / t
            last = f"{100 * bw / copy_bw:.0f}%" if device == "cuda" else f"{results[-1][1] / t:.1f}x"
            print(f"| {T} | {nbytes / 1e6:.0f} | {name} | {t * 1e3:.2f} | {bw / 1e9:.1f} | {last} |", flush=True)
        del k
    return 0


if __name__ == "__main__":
    sys.exit(main())
