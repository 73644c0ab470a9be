"""What every re-rotation path shares: argument checks, the per-token cos/sin
tables, and the fp64 reference the tests hold the fast paths to.

A cached key at position p holds R(theta * p) k. When an edit moves it by
delta tokens, R(theta * delta) R(theta * p) = R(theta * (p + delta)), so the
key is re-encoded in place without recomputing it from hidden states.
"""

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_args(k, delta, inv_freq, positions=None, rotary_dim=None, slots=None):
    """Validate the shared arguments; returns (n_tok, rotary_dim).

    n_tok is the length of delta's token axis: T, or S when slots are given.
    """
    assert k.dim() == 4, f"k must be (B, Hkv, T, D), got shape {tuple(k.shape)}"
    assert k.dtype in _FLOATS, f"k must be fp32/fp16/bf16, got {k.dtype}"
    B, _, T, D = k.shape
    R = D if rotary_dim is None else rotary_dim
    assert R % 2 == 0 and 0 < R <= D, f"rotary_dim must be even and in (0, {D}], got {R}"
    assert inv_freq.dim() == 1 and inv_freq.numel() == R // 2, (
        f"inv_freq must have rotary_dim/2 = {R // 2} entries, got shape {tuple(inv_freq.shape)}")
    assert inv_freq.dtype == torch.float32, f"inv_freq must be fp32 (as HF keeps it), got {inv_freq.dtype}"
    assert delta.dtype in _INTS, f"delta must be an integer tensor, got {delta.dtype}"
    if slots is None:
        n_tok = T
    else:
        assert slots.dim() == 1 and slots.dtype == torch.int64, (
            f"slots must be an int64 (S,) tensor, got {slots.dtype} of shape {tuple(slots.shape)}")
        n_tok = slots.numel()
    assert delta.shape in ((n_tok,), (B, n_tok)), (
        f"delta must be ({n_tok},) or ({B}, {n_tok}), got {tuple(delta.shape)}")
    if positions is not None:
        assert positions.shape == delta.shape, (
            f"positions must match delta's shape {tuple(delta.shape)}, got {tuple(positions.shape)}")
        assert positions.dtype in _INTS, f"positions must be an integer tensor, got {positions.dtype}"
    return n_tok, R


def rotation_angles(delta, inv_freq, positions=None):
    """fp64 angle per (token, pair): delta.shape + (rotary_dim/2,).

    With positions, the angle is the difference of the two fp32 products HF's
    rotary embedding forms (position.float() * inv_freq), taken exactly in fp64.
    The key then lands on exactly the angle HF would have used at p + delta,
    however large p is, and successive shifts telescope instead of drifting.
    """
    inv64 = inv_freq.double()
    if positions is None:
        return delta.double()[..., None] * inv64
    inv32 = inv_freq.float()
    # int -> fp32 is exact below 2**24, and so is HF's own .float() above it: same rounding
    old = positions.float()[..., None] * inv32
    new = (positions.to(torch.int64) + delta.to(torch.int64)).float()[..., None] * inv32
    return new.double() - old.double()  # exact: two fp32 values differ exactly in fp64


def rotation_tables(delta, inv_freq, positions=None, device=None, dtype=torch.float32):
    """(cos, sin) in `dtype` (fp32 for the kernels), each delta.shape + (rotary_dim/2,), contiguous.

    cos/sin are taken in fp64 on the host side so large angles (theta * 64k)
    keep full accuracy; the kernels only multiply and add.
    """
    device = inv_freq.device if device is None else device
    pos = None if positions is None else positions.to(device)
    ang = rotation_angles(delta.to(device), inv_freq.to(device), pos)
    return ang.cos().to(dtype).contiguous(), ang.sin().to(dtype).contiguous()


def pair_index(rotary_dim, interleaved):
    """Head-dim indices (i1, i2) of the pairs that rotate together."""
    half = rotary_dim // 2
    if interleaved:  # GPT-J: (0, 1), (2, 3), ...
        i1 = torch.arange(0, rotary_dim, 2)
        return i1, i1 + 1
    i1 = torch.arange(half)  # NeoX / HF rotate_half: (0, half), (1, half + 1), ...
    return i1, i1 + half


def rerotate_keys_reference(k, delta, inv_freq, *, positions=None, interleaved=False,
                            rotary_dim=None, slots=None):
    """Out-of-place fp64 re-rotation: the specification the fast paths are tested against.

    Same arguments as rerotate_keys_; returns a new fp64 tensor of k's shape.
    Written for obviousness, not speed.
    """
    n_tok, R = check_args(k, delta, inv_freq, positions, rotary_dim, slots)
    B = k.shape[0]
    out = k.detach().to(torch.float64).clone()  # (B, Hkv, T, D)
    tok = torch.arange(k.shape[2]) if slots is None else slots.cpu()
    ang = rotation_angles(delta.cpu(), inv_freq.cpu(), None if positions is None else positions.cpu())
    ang = ang.expand(B, n_tok, R // 2).to(k.device)  # (B, N, R/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (B, 1, N, R/2)
    i1, i2 = pair_index(R, interleaved)
    x = out[:, :, tok.to(k.device)]  # (B, Hkv, N, D), a copy
    x1, x2 = x[..., i1], x[..., i2]
    y = x.clone()
    y[..., i1] = x1 * cos - x2 * sin
    y[..., i2] = x2 * cos + x1 * sin
    # zero delta means "not moved": the key is kept as is, not rotated by 0
    moved = (delta.to(k.device) != 0).expand(B, n_tok)[:, None, :, None]
    out[:, :, tok.to(k.device)] = torch.where(moved, y, x)
    return out
