"""What the kernel tests share: the paths under test, random keys and deltas, and tolerances.

Without a GPU the Triton kernel runs under the Triton interpreter on CPU
tensors; with one, the same tests run it compiled on CUDA. Tolerances come
from the dtype's rounding (see noise()), not from hand-picked constants.
"""

import importlib.util
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of the kernel module (and of transformers)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from livekv import kernels  # noqa: E402
from livekv.kernels.rope import pair_index  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # interpreter on CPU
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

PATHS = [pytest.param((kernels.rerotate_keys_torch_, d), id=f"torch-{d}") for d in DEVICES] + [
    pytest.param((kernels.rerotate_keys_triton_, TRITON_DEVICE), id=f"triton-{TRITON_DEVICE}",
                 marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps
PROPS = settings(max_examples=25, deadline=None)


def inv_freq_for(rotary_dim, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def pair_norm(x, rotary_dim, interleaved):
    """|(x_i1, x_i2)| at both members of each rotating pair, |x| past rotary_dim. fp64."""
    x = x.double()
    i1, i2 = pair_index(rotary_dim, interleaved)
    out = x.abs()
    n = (x[..., i1] ** 2 + x[..., i2] ** 2).sqrt()
    out[..., i1], out[..., i2] = n, n
    return out


def noise(pn, dtype, roundings=1):
    """Worst-case error of `roundings` fp32 rotations each stored once in `dtype`.

    Per rotation: half an ulp of dtype at the pair's magnitude for the store, a few fp32
    ulps for the cos/sin tables, two products and a sum, plus half the smallest
    subnormal for values that land below dtype's normal range.
    """
    fi = torch.finfo(dtype)
    per = (fi.eps / 2 + 4 * EPS32) * pn + fi.smallest_normal * fi.eps / 2
    return roundings * per


def assert_close(out, ref, pn, dtype, roundings=1):
    err = (out.double() - ref.double()).abs()
    tol = noise(pn, dtype, roundings)
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; worst err/tol {(err / tol).max().item():.3g}"


def bits(x):
    """Integer view of a float tensor: compares NaNs and -0.0 exactly."""
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def rand_delta(shape, seed, lo=-50, hi=50, zero_frac=0.3):
    g = torch.Generator().manual_seed(seed + 1)
    d = torch.randint(lo, hi + 1, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < zero_frac, 0, d)


def run(path, k, delta, inv_freq, **kw):
    """Apply a path to a clone of k (moved to the path's device); returns the result on CPU."""
    fn, device = path
    kk = k.to(device).clone()
    ptr = kk.data_ptr()
    dev_kw = {n: (v.to(device) if torch.is_tensor(v) else v) for n, v in kw.items()}
    assert fn(kk, delta.to(device), inv_freq.to(device), **dev_kw) is kk
    assert kk.data_ptr() == ptr
    return kk.cpu()
