"""Validated settings: one dataclass per layer, each field described once, and all the rest made
from that description: validation, CLI flags, LSP setting names, a schema for editor clients and
the documentation tables.

    @dataclass(frozen=True)
    class Options(Settings):
        candidates: int = setting(1, "inline items for a manual trigger", min=1, max=5)

A field's type is its annotation: int, float, bool, str, or those `| None`, or list[str]. `lsp=True`
makes it an LSP setting (camelCase: maxNewTokens for max_new_tokens) and a websocket option.
Invalid values raise ValueError saying what was wrong; nothing falls back to a default.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, field, fields, replace
from typing import Any

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def setting(default: Any, help: str, *, min: int | None = None, max: int | None = None,
            choices: tuple | None = None, lsp: bool = False, flag: bool = True, metavar: str | None = None):
    """A field of a Settings dataclass: its default, what it means (one line), its limits."""
    meta = dict(help=help, min=min, max=max, choices=choices, lsp=lsp, flag=flag, metavar=metavar)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def kind(f) -> tuple[str, bool]:
    """(base type name, whether None is allowed) of a field's annotation."""
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in ann.split("|")]
    optional = "None" in parts
    base = [p for p in parts if p != "None"][0]
    return ("list" if base.startswith("list") else base), optional


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def check(name: str, f, value) -> None:
    """ValueError saying what is wrong with value for field f."""
    base, optional = kind(f)
    m = f.metadata
    if value is None:
        if optional:
            return
        raise ValueError(f"{name} must not be null")
    if base == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, got {value!r}")
        return
    want = (int, float) if base == "float" else _TYPES[base]  # an integer is a fine float
    if isinstance(value, bool) != (base == "bool") or not isinstance(value, want):
        what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[base]
        raise ValueError(f"{name} must be {what}{' or null' if optional else ''}, got {value!r}")
    if m.get("choices") is not None and value not in m["choices"]:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(map(str, m['choices']))}")
    if m.get("min") is not None and value < m["min"]:
        raise ValueError(f"{name} must be at least {m['min']}, got {value}")
    if m.get("max") is not None and value > m["max"]:
        raise ValueError(f"{name} must be at most {m['max']}, got {value}")


class Settings:
    """Mixed into a dataclass whose fields are made with setting()."""

    def __post_init__(self):
        for f in fields(self):
            check(f.name, f, getattr(self, f.name))

    def updated(self, **changes):
        """A validated copy with some fields changed; unknown names are refused."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}: known are {sorted(known)}")
        return replace(self, **changes)

    # -- command line ---------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field: --max-new-tokens for max_new_tokens, --no-prefetch for a bool."""
        for f in fields(cls):
            if not f.metadata.get("flag", True):
                continue
            base, _ = kind(f)
            flag, default = "--" + f.name.replace("_", "-"), default_of(f)
            kw = dict(dest=f.name, default=None, help=f"{f.metadata['help']} (default {default!r})")
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
            if base == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif base == "list":
                parser.add_argument(flag, action="append", **kw)
            else:
                parser.add_argument(flag, type=_TYPES[base], choices=f.metadata.get("choices"), **kw)

    @classmethod
    def from_arguments(cls, ns: argparse.Namespace, **overrides):
        """The settings named by parsed flags; flags left out keep their defaults."""
        given = {f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name, None) is not None}
        return cls(**dict(given, **overrides))

    # -- LSP settings ---------------------------------------------------------------------------
    @classmethod
    def lsp_fields(cls) -> dict[str, Any]:
        """camelCase setting name -> field, for the fields clients may set."""
        return {camel(f.name): f for f in fields(cls) if f.metadata.get("lsp")}

    @classmethod
    def from_lsp(cls, section: dict) -> dict:
        """Field changes named by a client's settings object (keys this class does not know are
        the caller's to judge); ValueError for a value of the wrong type or out of range."""
        changes = {}
        for key, f in cls.lsp_fields().items():
            if key in section:
                try:
                    check(f.name, f, section[key])
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
                changes[f.name] = section[key]
        return changes

    # -- documentation --------------------------------------------------------------------------
    @classmethod
    def schema(cls) -> list[dict]:
        """Every field as {name, flag, lsp, type, nullable, default, min, max, choices, help}."""
        out = []
        for f in fields(cls):
            base, optional = kind(f)
            m = f.metadata
            out.append(dict(name=f.name, flag="--" + f.name.replace("_", "-") if m.get("flag", True) else None,
                            lsp=camel(f.name) if m.get("lsp") else None, type=base, nullable=optional,
                            default=default_of(f), min=m.get("min"), max=m.get("max"),
                            choices=list(m["choices"]) if m.get("choices") else None, help=m["help"]))
        return out


def markdown_table(rows: list[dict], key: str) -> str:
    """A markdown table of schema rows by `key` ("flag" or "lsp"), with default and meaning."""
    lines = [f"| {'flag' if key == 'flag' else 'setting'} | type | default | meaning |", "|---|---|---|---|"]
    for r in rows:
        if not r[key]:
            continue
        typ = ", ".join(f"`{c}`" for c in r["choices"]) if r["choices"] else r["type"]
        if r["min"] is not None or r["max"] is not None:
            typ += f" {r['min'] if r['min'] is not None else ''}..{r['max'] if r['max'] is not None else ''}"
        default = "null" if r["default"] is None else str(r["default"]).lower() if isinstance(r["default"], bool) \
            else f"`{r['default']}`" if r["default"] not in ("", []) else "none"
        lines.append(f"| `{r[key]}` | {typ}{' or null' if r['nullable'] else ''} | {default} | "
                     f"{re.sub(r'[|]', '/', r['help'])} |")
    return "\n".join(lines) + "\n"
