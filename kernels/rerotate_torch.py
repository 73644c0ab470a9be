"""Vectorised torch re-rotation: the CPU path (and a fallback anywhere).

All layers go in one call (the engine folds layers into B), only the token
slots that actually moved are touched, and the result goes back with a single
slice assignment or index_copy_.
"""

import torch

from .rope import check_args, rotation_tables


def rerotate_keys_torch_(k, delta, inv_freq, *, positions=None, interleaved=False,
                         rotary_dim=None, slots=None):
    """Rotate cached keys in place by per-token position shifts (torch ops).

    k: (B, Hkv, T, D) fp32/fp16/bf16, any strides (a view of a bigger buffer is
    fine; it is written through, never replaced). delta: integer (N,) or (B, N)
    where N = T, or S when slots (int64 (S,), unique indices into T) are given.
    positions: optional integer, delta's shape, the position each key is at now
    (gives HF-exact angles, see rope.rotation_angles). inv_freq: fp32
    (rotary_dim/2,). Keys with delta 0 and dims past rotary_dim stay bit-exact.
    Returns k.
    """
    n_tok, R = check_args(k, delta, inv_freq, positions, rotary_dim, slots)
    dev = k.device
    delta = delta.to(dev)
    positions = None if positions is None else positions.to(dev)

    # token columns that move for at least one batch row; the rest are never read
    nz = delta != 0  # (N,) or (B, N)
    sel = (nz if delta.dim() == 1 else nz.any(0)).nonzero().squeeze(1)  # (M,)
    M = sel.numel()
    if M == 0 or k.shape[0] == 0 or k.shape[1] == 0:
        return k
    if M < n_tok:
        delta = delta[..., sel]
        positions = None if positions is None else positions[..., sel]
        nz = nz[..., sel]
    # fp32 math for every cache dtype (half-precision keys are promoted by the ops), with exact
    # angles from rotation_tables: the rounding noise of a rotation is a few ulps, which over many
    # edits adds up as a random walk, not a drift (test_many_edits_do_not_drift). fp64 math had
    # ~20x less noise after 1,000 edits but cost 3-4x the time of an edit's rotation on a CPU.
    cos, sin = rotation_tables(delta, inv_freq, positions, device=dev, dtype=torch.float32)  # (M, R/2) or (B, M, R/2)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, M, R/2): broadcast over heads

    kr = k[..., :R]  # (B, Hkv, T, R) view: dims past rotary_dim are never read or written
    tok = sel if slots is None else slots.to(dev)[sel]  # (M,) indices into T
    # the usual edit shifts one contiguous run of tokens: a slice view beats a gather
    lo = int(tok[0])
    run = bool((tok == torch.arange(lo, lo + M, device=dev)).all())
    src = kr[:, :, lo:lo + M] if run else kr.index_select(2, tok)  # (B, Hkv, M, R) view or copy
    # rows with delta 0 in a moved column keep their loaded bits (x * 1 - y * 0 is not
    # always x: -0.0 and non-finite values would change), so those need the original
    masked = delta.dim() == 2 and not bool(nz.all())

    if run and not masked:  # the common case: rotate straight into place
        _rotate_into(kr[:, :, lo:lo + M], src, cos, sin, interleaved)
        return k
    out = torch.empty_like(src)
    _rotate_into(out, src, cos, sin, interleaved)
    if masked:
        out = torch.where(nz[:, None, :, None], out, src)
    if run:
        kr[:, :, lo:lo + M] = out
    else:
        kr.index_copy_(2, tok, out)
    return k


def _halves(x, interleaved):
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


# Tokens a block of _rotate_into on a CPU: each batch row (layer) and block of tokens is rotated
# apart, so that its temporaries stay in the CPU's cache (all layers at once ran 2-3x slower at 8k
# tokens). Elsewhere (a GPU without Triton) one block: each op is a kernel launch there.
ROTATE_BLOCK = 512


def _rotate_into(out, x, cos, sin, interleaved):
    """out = x's pairs rotated by angles with these cos/sin, (M, R/2) or (B, 1, M, R/2); out
    may be x itself. On a CPU batch row by batch row, ROTATE_BLOCK tokens at a time."""
    if x.device.type != "cpu":
        _rotate_block(out, x, cos, sin, interleaved)
        return
    B, M = x.shape[0], x.shape[2]
    for b in range(B):
        c, s = (cos, sin) if cos.dim() == 2 else (cos[b], sin[b])
        for a in range(0, M, ROTATE_BLOCK):
            e = min(M, a + ROTATE_BLOCK)
            _rotate_block(out[b, :, a:e], x[b, :, a:e], c[..., a:e, :], s[..., a:e, :], interleaved)


def _rotate_block(out, x, cos, sin, interleaved):
    """_rotate_into on one block. x1 cos - x2 sin and x2 cos + x1 sin, in fp32: an fp32 cache
    rotated in place takes one temporary (its first half's ops run on the cache itself, the
    same operations in the same order), any other is rotated in fp32 temporaries and each half
    goes to the cache dtype on its copy_. No full-width copy: this is bandwidth-bound."""
    x1, x2 = _halves(x, interleaved)
    o1, o2 = _halves(out, interleaved)
    t2 = torch.mul(x2, cos)
    t2.addcmul_(x1, sin)  # x2 cos + x1 sin
    if out.data_ptr() == x.data_ptr() and x.dtype == cos.dtype:
        x1.mul_(cos)
        x1.addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin, x2 not yet written
    else:
        t1 = torch.mul(x1, cos)
        t1.addcmul_(x2, sin, value=-1)
        o1.copy_(t1)
    o2.copy_(t2)
