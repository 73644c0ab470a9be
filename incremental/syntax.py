"""A tree-sitter-python tree of a document, kept up to date edit by edit (tree.edit + reparse).

Completions use it to tell a block-opening colon (`if x:`) from any other (`{a: b}`, `lambda:`),
and the LSP server uses it to find what a file imports. Tree-sitter counts rows at "\n" and
columns in UTF-8 bytes.
"""
from __future__ import annotations

import logging

log = logging.getLogger("livekv")

# node types whose ':' opens an indented block
BLOCK_OPENERS = frozenset({
    "function_definition", "class_definition", "if_statement", "elif_clause", "else_clause",
    "for_statement", "while_statement", "with_statement", "try_statement", "except_clause",
    "except_group_clause", "finally_clause", "match_statement", "case_clause"})

_PARSER = None


def _parser():
    global _PARSER
    if _PARSER is None:
        import tree_sitter as ts
        import tree_sitter_python as tsp
        _PARSER = ts.Parser(ts.Language(tsp.language()))
    return _PARSER


def _point(text: str, offset: int) -> tuple[int, int]:
    row = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    return row, len(text[start:offset].encode("utf-8"))


class SyntaxTree:
    """The parse tree of one document. `edit` then `reparse` after each batch of changes."""

    def __init__(self, text: str):
        self.text = text
        self.tree = _parser().parse(text.encode("utf-8"))
        self.reparses = 0

    def edit(self, a: int, b: int, new: str) -> None:
        """Tell the tree that chars [a, b) of the current text became `new` (not reparsed yet)."""
        old = self.text
        start_byte = len(old[:a].encode("utf-8"))
        old_end_byte = start_byte + len(old[a:b].encode("utf-8"))
        text = old[:a] + new + old[b:]
        self.tree.edit(start_byte=start_byte, old_end_byte=old_end_byte,
                       new_end_byte=start_byte + len(new.encode("utf-8")),
                       start_point=_point(old, a), old_end_point=_point(old, b),
                       new_end_point=_point(text, a + len(new)))
        self.text = text

    def reparse(self) -> None:
        """Reparse incrementally, reusing every subtree the edits left alone."""
        self.tree = _parser().parse(self.text.encode("utf-8"), self.tree)
        self.reparses += 1

    def node_before(self, offset: int):
        """The smallest node ending at or just before char offset (skipping whitespace)."""
        i = offset
        while i > 0 and self.text[i - 1] in " \t":
            i -= 1
        if i == 0:
            return None
        row, col = _point(self.text, i - 1)
        return self.tree.root_node.descendant_for_point_range((row, col), (row, col))

    def opens_block(self, offset: int) -> bool:
        """Whether the text just before offset ends with a block-opening ':'."""
        node = self.node_before(offset)
        if node is None or node.type != ":":
            return False
        parent = node.parent
        return parent is not None and parent.type in BLOCK_OPENERS

    def imports(self) -> list[str]:
        """Dotted module names this file imports, in order: `import a.b` -> 'a.b';
        `from .c import d` -> '.c.d' (d may be a module; resolvers fall back to '.c')."""
        out = []
        for node in self.tree.root_node.children:
            if node.type == "import_statement":
                out += [c.text.decode() for c in node.children if c.type in ("dotted_name", "aliased_import")]
            elif node.type == "import_from_statement":
                mod = node.child_by_field_name("module_name")
                if mod is None:
                    continue
                base = mod.text.decode()
                names = [c.text.decode() for c in node.children_by_field_name("name")]
                sep = "" if base.endswith(".") else "."
                out += [base + sep + n.split(" as ")[0].strip() for n in names] or [base]
        return [m.split(" as ")[0].strip() for m in out]
