"""Weight formats kept on disk between loads of the same weights.

Finding a GGUF's blocks again (quant.grid) and packing them for torch's kernels is most of a
load on a CPU: for Qwen2.5-Coder, its int8 blocks and ranking head take longer than reading
the model. For the same weights, the same torch and the same format code they come out
as the same bytes, so the first load writes them under the cache dir and later loads read them.

The file's name holds everything they depend on: a fingerprint of the weights (every
projection's shape and a checksum of all its bytes), torch's version and CPU capability, and a
hash of the source that makes them (quant.py, proj.py, precision.py). Writing a file removes the same
weights' files of other versions. A file that does not read back is made again, with a warning;
a cache that cannot be written only costs the next load the time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zlib
from pathlib import Path

import torch

from . import precision, proj, quant
from .quant import Int4, Int8, Int8Channels

log = logging.getLogger("livekv")

STORED = ("int8", "int4", "rank", "channels")  # the formats worth keeping: bf16 copies are a cast
KINDS = {cls.__name__: cls for cls in (Int4, Int8, Int8Channels)}


def fingerprint(weights: list[torch.Tensor]) -> str:
    """A hash of the weights' shapes, dtypes and every byte (a CRC-32 per weight: about a
    second for the coder's 2 GB, where its block search takes ten)."""
    h = hashlib.blake2b(digest_size=16)
    for w in weights:
        raw = w.detach().contiguous().view(torch.uint8).reshape(-1).cpu().numpy()
        h.update(repr((tuple(w.shape), str(w.dtype), zlib.crc32(raw.data))).encode())
    return h.hexdigest()


def _code() -> str:
    """A hash of the code that makes the formats: quant.py, proj.py, which says which format
    each mode is, and precision.py, which says which modes are made."""
    h = hashlib.blake2b(digest_size=8)
    for module in (quant, proj, precision):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def encode(fmt) -> dict:
    """A format (quant.py) as a dict that torch.load(weights_only=True) reads back."""
    return {"kind": type(fmt).__name__, **vars(fmt)}


def decode(d: dict):
    d = dict(d)
    return KINDS[d.pop("kind")](**d)


class FormatStore:
    """The file of one model's stored formats: {"blocks": Precision.blocks()'s answer, "formats":
    {mode: {index: format}}}, index numbering Precision.stored()'s projections."""

    def __init__(self, cache: Path, weights: list[torch.Tensor]):
        cap = torch.backends.cpu.get_cpu_capability()
        version = torch.__version__.replace("+", "_")
        self.weights_id = fingerprint(weights)
        self.path = Path(cache) / "formats" / f"{self.weights_id}-torch{version}-{cap}-{_code()}.pt"
        self.read_keys: set[tuple[str, int]] = set()

    def read(self) -> dict | None:
        """What an earlier load stored, decoded; None when there is none or it does not read."""
        if not self.path.exists():
            return None
        try:
            raw = torch.load(self.path, weights_only=True)
            data = {"blocks": raw["blocks"],
                    "formats": {m: {int(i): decode(f) for i, f in fs.items()} for m, fs in raw["formats"].items()}}
        except Exception as e:  # noqa: BLE001 - a bad file is made again, never a failed load
            log.warning("could not read the stored weight formats %s (%s: %s); making them again",
                        self.path, type(e).__name__, e)
            return None
        self.read_keys = {(m, i) for m, fs in data["formats"].items() for i in fs}
        log.info("read the stored weight formats %s", self.path.name)
        return data

    def write(self, data: dict) -> bool:
        """Store data unless it holds nothing that was not read. Returns whether it wrote."""
        keys = {(m, i) for m, fs in data["formats"].items() for i in fs}
        if keys <= self.read_keys:
            return False
        raw = {"blocks": data["blocks"],
               "formats": {m: {i: encode(f) for i, f in fs.items()} for m, fs in data["formats"].items()}}
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(raw, tmp)
            os.replace(tmp, self.path)
            for old in self.path.parent.glob(f"{self.weights_id}-*.pt"):  # other torch or code versions
                if old != self.path:
                    old.unlink(missing_ok=True)
        except OSError as e:  # a read-only cache only costs the next load its time
            log.warning("could not store the weight formats under %s (%s); the next load makes them again",
                        self.path.parent, e)
            try:
                tmp.unlink()
            except OSError:
                pass
            return False
        self.read_keys = keys
        return True
