"""Weight formats kept between loads (format_store.py): a second load of the same weights reads
the bytes the first made (no block search runs), the same weights give the same file, other
weights or other format code another, and a file that does not read back is made again."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from livekv.incremental import Engine, quant
from livekv.incremental.format_store import STORED, FormatStore, decode, encode
from livekv.incremental.precision import Precision
from livekv.incremental.quant import Int4, Int8, Int8Channels

from test_quant import NEEDS, gguf_like, snapped

FORMATS = {"int4": Int4, "int8": Int8, "rank": Int4, "channels": Int8Channels}


def same(a, b) -> bool:
    """Two formats of one kind with equal fields, tensors bit for bit."""
    if type(a) is not type(b) or vars(a).keys() != vars(b).keys():
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
               for x, y in zip(vars(a).values(), vars(b).values()))


@NEEDS
@settings(max_examples=12, deadline=None)
@given(mode=st.sampled_from(sorted(FORMATS)), kind=st.sampled_from(["q4_1", "q8_0", "none"]),
       n=st.sampled_from([16, 48]), k=st.sampled_from([32, 96]), seed=st.integers(0, 1000))
def test_every_format_reads_back_bit_for_bit(tmp_path_factory, mode, kind, n, k, seed):
    w = gguf_like(kind, seed, n=n, k=k) if kind != "none" else torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    fmt = FORMATS[mode].of(w)
    path = tmp_path_factory.mktemp("fmt") / "f.pt"
    torch.save(encode(fmt), path)
    assert same(decode(torch.load(path, weights_only=True)), fmt)


def snapped_llama(tiny_engine, kind: str):
    """The tiny Llama with every projection on a GGUF kind's grid."""
    hf = copy.deepcopy(tiny_engine.model.hf)
    for lin in hf.modules():
        if isinstance(lin, torch.nn.Linear) and lin is not hf.lm_head:
            lin.weight.data = snapped(lin.weight.data, kind)
    return hf


@NEEDS
@pytest.mark.parametrize("kind, blocks", [("q4_1", "int4"), ("q8_0", "int8")])
def test_a_second_load_of_the_same_weights_reads_the_formats_the_first_made(tiny_engine, tmp_path, monkeypatch,
                                                                            kind, blocks):
    hf = snapped_llama(tiny_engine, kind)
    first = Precision(copy.deepcopy(hf))
    store = FormatStore(tmp_path, first.weights())
    assert store.read() is None
    assert first.blocks() == blocks
    first.prepare(blocks)
    assert store.write(first.stored(STORED)) and store.path.exists()

    def no_search(*a, **kw):
        raise AssertionError("the block search ran on a load that had the formats stored")
    monkeypatch.setattr(quant, "grid", no_search)
    again = Precision(copy.deepcopy(hf))
    store2 = FormatStore(tmp_path, again.weights())
    assert store2.path == store.path                  # the same weights, torch and code: the same file
    again.adopt(store2.read())
    assert again.blocks() == blocks                   # decided by the first load
    again.prepare(blocks)                             # made nothing by search
    made, read = first.stored(STORED)["formats"], again.stored(STORED)["formats"]
    assert made.keys() == read.keys() == {blocks, "rank"}
    for m in made:
        assert made[m].keys() == read[m].keys() and all(same(made[m][i], read[m][i]) for i in made[m])
    assert not store2.write(again.stored(STORED))     # nothing new to write


@NEEDS
def test_other_weights_or_other_format_code_have_their_own_file_and_a_bad_file_is_made_again(
        tiny_engine, tmp_path, monkeypatch, caplog):
    hf = snapped_llama(tiny_engine, "q4_1")
    P = Precision(hf)
    store = FormatStore(tmp_path, P.weights())
    other = copy.deepcopy(hf)
    other.model.layers[1].mlp.down_proj.weight.data[-1, -1] += 1.0   # one value
    assert FormatStore(tmp_path, Precision(other).weights()).path != store.path
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="livekv"):
        assert store.read() is None
    assert "could not read the stored weight formats" in caplog.text
    P.prepare("int4")
    assert store.write(P.stored(STORED))
    assert FormatStore(tmp_path, P.weights()).read()["formats"].keys() == {"int4", "rank"}
    monkeypatch.setattr("livekv.incremental.format_store._code", lambda: "changed")
    newer = FormatStore(tmp_path, P.weights())
    assert newer.path != store.path and newer.read() is None          # other format code: its own file
    assert newer.write(P.stored(STORED))
    assert newer.path.exists() and not store.path.exists()            # the same weights' older file goes


@NEEDS
def test_engine_loads_store_and_reuse_the_formats_and_a_read_only_cache_costs_only_time(tiny_engine, tmp_path_factory,
                                                                                        caplog):
    """End to end: a model directory loaded twice at auto; the second load reads what the first
    stored, and answers the same. A cache it cannot write to still loads."""
    root = tmp_path_factory.mktemp("store")
    model_dir, cache = root / "model", root / "cache"
    hf = snapped_llama(tiny_engine, "q4_1")
    hf.save_pretrained(model_dir)
    tiny_engine.tokenizer.save_pretrained(model_dir)
    loads = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="livekv"):
            loads.append(Engine.load(str(model_dir), cache_dir=str(cache), max_new_tokens=6))
    assert "read the stored weight formats" in caplog.text   # the second load's
    assert [e.precision for e in loads] == ["int4", "int4"]
    assert len(list((cache / "formats").glob("*.pt"))) == 1
    text = "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return\n"
    ids = [e.open("file:///m.py", text).suggest(4, 10).ids for e in loads]
    assert ids[0] == ids[1] and len(ids[0]) >= 1
    fp32 = Engine.load(str(model_dir), cache_dir=str(cache), max_new_tokens=6, precision="fp32")
    assert not any("int4" in p.formats(("int4",)) for p in fp32.model.precision._projs())  # read, and not kept
    locked = root / "locked"
    locked.write_text("a file where the cache dir should be")
    assert Engine.load(str(model_dir), cache_dir=str(locked / "sub"), max_new_tokens=6).precision == "int4"


@pytest.mark.parametrize("module", ["quant", "proj", "precision"])
def test_the_format_key_changes_with_each_module_that_makes_or_picks_the_formats(module, tmp_path, monkeypatch):
    """quant.py makes the formats, proj.py says which one each mode is, precision.py which modes
    are made: an edit to any of them must not read an older file."""
    import importlib
    from livekv.incremental import format_store
    mod = importlib.import_module(f"livekv.incremental.{module}")
    before = format_store._code()
    edited = tmp_path / f"{module}.py"
    edited.write_bytes(Path(mod.__file__).read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(mod, "__file__", str(edited))
    assert format_store._code() != before
