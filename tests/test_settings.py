"""One schema for every setting: the dataclasses (Config, LspOptions, ServeOptions) validate, make
the CLI flags and the LSP names, and the documentation tables and the VS Code extension's
settings agree with them."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from livekv.incremental.config import Config
from livekv.lsp_server.cli import main
from livekv.lsp_server.options import LspOptions, ServeOptions, schema_markdown
from livekv.lsp_server.protocol import parse_settings

from lsp_helpers import ROOT

LAYERS = (Config, LspOptions, ServeOptions)


def generated(path: str) -> str:
    text = (ROOT / path).read_text(encoding="utf-8")
    m = re.search(r"<!-- made by `livekv settings --markdown (\w+)`.*?-->\n(.*?)<!-- end of the generated table -->",
                  text, re.S)
    assert m, f"{path} has no generated settings table"
    return m[1], m[2]


@pytest.mark.parametrize("path", ["editor-clients/README.md", "docs/protocol.md"])
def test_the_documented_tables_are_the_schema(path):
    which, table = generated(path)
    assert table == schema_markdown(which), f"regenerate it: livekv settings --markdown {which}"


def test_the_vscode_extension_declares_every_lsp_setting_as_the_schema_does():
    props = json.loads((ROOT / "editor-clients/vscode/package.json").read_text())["contributes"]["configuration"][
        "properties"]
    json_type = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
    rows = [r for cls in (Config, LspOptions) for r in cls.schema() if r["lsp"]]
    assert rows and {f"livekv.{r['lsp']}" for r in rows} <= set(props)
    for r in rows:
        p = props[f"livekv.{r['lsp']}"]
        types = p["type"] if isinstance(p["type"], list) else [p["type"]]
        assert json_type[r["type"]] in types, (r["lsp"], p)
        assert p.get("minimum") == r["min"] and p.get("maximum") == r["max"], (r["lsp"], p)
        if r["choices"]:
            assert [c for c in p["enum"] if c is not None] == r["choices"], (r["lsp"], p)


def test_every_field_is_a_flag_and_its_value_arrives(capsys):
    for cls in LAYERS:
        for r in cls.schema():
            assert r["flag"] == "--" + r["name"].replace("_", "-")
    with pytest.raises(SystemExit):
        main(["lsp", "--help"])
    out = capsys.readouterr().out
    assert all(f"--{r['name'].replace('_', '-')}" in out for cls in (Config, LspOptions) for r in cls.schema())
    import argparse
    p = argparse.ArgumentParser()
    Config.add_arguments(p)
    ServeOptions.add_arguments(p)
    ns = p.parse_args(["--max-new-tokens", "3", "--no-multiline", "--allow-origin", "a", "--allow-origin", "b"])
    assert Config.from_arguments(ns).max_new_tokens == 3 and Config.from_arguments(ns).multiline is False
    assert ServeOptions.from_arguments(ns).allow_origin == ["a", "b"] and ServeOptions.from_arguments(ns).port == 8765


@pytest.mark.parametrize("bad, words", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(max_new_tokens=257), "at most 256"),
    (dict(max_new_tokens="5"), "must be an integer"),
    (dict(multiline=1), "must be true or false"),
    (dict(strategy="fast"), "not one of"),
    (dict(dtype="int8"), "not one of"),
    (dict(device="tpu"), "unknown device"),
    (dict(model=3), "must be a string or null"),
])
def test_invalid_engine_settings_say_what_is_wrong(bad, words):
    with pytest.raises(ValueError, match=words):
        Config(**bad)
    with pytest.raises(ValueError, match=words):
        Config().updated(**bad)


def test_invalid_server_settings_say_what_is_wrong():
    for cls, bad, words in [(LspOptions, dict(candidates=6), "at most 5"), (LspOptions, dict(tcp="nowhere"), "HOST:PORT"),
                            (ServeOptions, dict(token=""), "must not be empty"),
                            (ServeOptions, dict(max_message_bytes=10), "at least 1024"),
                            (ServeOptions, dict(allow_origin="x"), "list of strings")]:
        with pytest.raises(ValueError, match=words):
            cls(**bad)


def test_zero_new_tokens_is_refused_not_the_default(tiny_engine):
    doc = tiny_engine.open("file:///zero.py", "x = 1\n")
    for n in (0, -1, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer of at least 1"):
            doc.complete(1, 0, max_new_tokens=n)
    assert doc.complete(1, 0, max_new_tokens=1) == doc.complete(1, 0, max_new_tokens=1)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["maxNewTokens", "candidates", "multiline", "strategy", "maxPromptMs",
                                        "repoContext", "maxLines"]),
                       st.one_of(st.integers(-3, 300), st.booleans(), st.text(max_size=8), st.none()), max_size=4))
def test_lsp_settings_are_accepted_exactly_when_the_dataclasses_accept_them(section):
    """parse_settings is the schema: what it lets through builds valid dataclasses, and what it
    refuses, they refuse too."""
    from livekv.lsp_server.options import split_settings
    try:
        changes = parse_settings({"livekv": section})
    except ValueError:
        changes = None
    try:
        config, options = split_settings({Config.lsp_fields().get(k, LspOptions.lsp_fields().get(k)).name: v
                                          for k, v in section.items()})
        Config(**config), LspOptions(**options)
        valid = True
    except (ValueError, TypeError):
        valid = False
    assert (changes is not None) == valid, (section, changes)


def test_livekv_settings_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "livekv", "settings"], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert set(got) == {"engine", "lsp", "serve"}
    assert {r["name"] for r in got["engine"]} == {r["name"] for r in Config.schema()}


def test_an_empty_strategy_is_refused_not_the_default(tiny_engine):
    with pytest.raises(ValueError, match="unknown strategy ''"):
        tiny_engine.open("file:///s.py", "x = 1\n", strategy="")
    doc = tiny_engine.open("file:///s.py", "x = 1\n")
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        doc.fork("file:///s2.py", strategy="fast")
    with pytest.raises(ValueError, match="max_lines must be an integer of at least 1"):
        doc.suggest(1, 0, max_lines=0)
