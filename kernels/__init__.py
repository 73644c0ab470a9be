"""Key re-rotation for a live KV cache.

rerotate_keys_ rotates cached keys in place (the engine calls it from one place,
incremental.region); rotated_keys returns a rotated copy of some key columns, for
temporaries. rerotate_keys_ picks the implementation from where k lives: the
Triton kernel for CUDA tensors, vectorised torch ops otherwise. triton is imported
only when the Triton path is first used, so `livekv.kernels` imports on CPU-only
installs.
"""

import importlib.util

from .rerotate_torch import rerotate_keys_torch_
from .rope import rerotate_keys_reference, rotation_tables

__all__ = ["rerotate_keys_", "rerotate_keys_triton_", "rerotate_keys_torch_",
           "rerotate_keys_reference", "rotated_keys", "rotation_tables"]

# a CUDA install without the optional triton extra still works, on the torch path
HAS_TRITON = importlib.util.find_spec("triton") is not None


def rerotate_keys_triton_(k, delta, inv_freq, *, positions=None, interleaved=False,
                          rotary_dim=None, slots=None):
    """The Triton path, callable directly (on CPU tensors too under TRITON_INTERPRET=1,
    which must be set before the first call imports the kernel module)."""
    from .rerotate_triton import rerotate_keys_triton_ as impl  # lazy: imports triton
    return impl(k, delta, inv_freq, positions=positions, interleaved=interleaved,
                rotary_dim=rotary_dim, slots=slots)


def rerotate_keys_(k, delta, inv_freq, *, positions=None, interleaved=False,
                   rotary_dim=None, slots=None):
    """Rotate cached keys in place so keys moved by an edit encode their new positions.

    Triton kernel for CUDA tensors (torch ops if triton is missing), torch ops on CPU.

    k: (B, Hkv, T, D) cache keys (HF layout), fp32/fp16/bf16, any strides. A view
        of a larger buffer is written through: pass all layers at once as
        buf[:, :, s:e] of an (L, Hkv, capacity, D) buffer.
    delta: integer (N,) or (B, N), the shift of each token (N = T, or S with slots).
    inv_freq: fp32 (rotary_dim/2,), model.model.rotary_emb.inv_freq (scaling
        already folded in; YaRN's attention_scaling must not be applied to a shift).
    positions: optional integer, delta's shape: the position each key is at now.
        Makes the result match HF's encoding at positions + delta to fp32
        rounding, and successive shifts telescope without drift.
    interleaved: False for NeoX/HF rotate_half pairs (d, d + rotary_dim/2),
        True for GPT-J adjacent pairs (2i, 2i + 1).
    rotary_dim: partial rotary; dims past it are left untouched. Default D.
    slots: optional int64 (S,) unique token indices into T to rotate.

    Keys with delta 0 keep their exact bits. Returns k (same storage).
    """
    impl = rerotate_keys_triton_ if k.is_cuda and HAS_TRITON else rerotate_keys_torch_
    return impl(k, delta, inv_freq, positions=positions, interleaved=interleaved,
                rotary_dim=rotary_dim, slots=slots)


def rotated_keys(k, slots, delta, inv_freq, *, positions=None, interleaved=False, rotary_dim=None):
    """A copy of k's token columns `slots`, each rotated by its delta: (B, Hkv, S, D).

    For temporaries, such as attention over keys whose rotation a lazy layout deferred; the
    cache's own keys are rotated in place with rerotate_keys_. slots: int64 (S,) indices into
    k's token axis; delta and positions as for rerotate_keys_, one per slot.
    """
    out = k.index_select(2, slots.to(k.device))
    return rerotate_keys_(out, delta, inv_freq, positions=positions, interleaved=interleaved,
                          rotary_dim=rotary_dim)
