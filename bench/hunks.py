"""
Edits and diff hunks for the edit-replay traces.

A document is a str; positions are 0-based (line, column) pairs, columns counted in code points
of that line, lines as LSP ends them (livekv.incremental.lines, the one converter).
"""

import ast
import difflib
import io
import re
import token
import tokenize

from livekv.incremental.lines import line_starts, resolve, split_lines, to_offset, to_position


def strip_eol(line: str) -> str:
    return line.rstrip("\r\n")


def position_to_offset(text: str, line: int, col: int) -> int:
    """Offset into text of the 0-based (line, col); ValueError if there is no such place."""
    return to_offset(line_starts(text), text, line, col)


def offset_to_position(text: str, offset: int) -> tuple[int, int]:
    """Inverse of position_to_offset; ValueError for an offset inside a "\r\n" or out of range."""
    return to_position(line_starts(text), text, offset)


def apply_edits(text: str, edits) -> str:
    """Apply edits ({"start", "end", "text"} dicts) one after another, in order."""
    return resolve(text, [((tuple(e["start"]), tuple(e["end"])), e["text"]) for e in edits])[0]


# ---------------------------------------------------------------- hunks

def hunks(old_lines: list[str], new_lines: list[str]) -> list[tuple[int, int, int, int]]:
    """Non-equal difflib opcodes (i1, i2, j1, j2): old[i1:i2] becomes new[j1:j2]."""
    sm = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    return [(i1, i2, j1, j2) for tag, i1, i2, j1, j2 in sm.get_opcodes() if tag != "equal"]


def hunk_header(i1, i2, j1, j2) -> str:
    # unified-diff style, 1-based; an empty side names the line before it, as diff -u does
    return f"@@ -{i1 + (i2 > i1)},{i2 - i1} +{j1 + (j2 > j1)},{j2 - j1} @@"


# a line that tells a model nothing: brackets closing something above, a bare
# block keyword, a lone docstring delimiter
_TRIVIA = re.compile(r"""[)\]}]+[,:;]?|(?:else|try|finally|except)\s*:|(?:\"\"\"|''')""")


def is_substantive(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#") and not _TRIVIA.fullmatch(s)


def pick_target(old: list[str], new: list[str], i1, i2, j1, j2) -> int | None:
    """The line of new[j1:j2] to predict: the first substantive one, preferring lines that
    are not just old lines of the hunk moved or re-indented, and never one equal to the
    line the cursor will sit on (old[i2]), whose answer would be in plain sight."""
    at_cursor = old[i2].strip() if i2 < len(old) else None
    ok = [k for k in range(j1, j2) if is_substantive(new[k]) and new[k].strip() != at_cursor]
    seen = {line.strip() for line in old[i1:i2]}
    return next((k for k in ok if new[k].strip() not in seen), ok[0] if ok else None)


# ---------------------------------------------------------------- format-only hunks

class _StripAnnotations(ast.NodeTransformer):
    # an annotation change alone does not change what the code does
    def visit_arg(self, node):
        node.annotation = None
        return node

    def visit_FunctionDef(self, node):
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        if node.value is None:  # a bare declaration `x: int` still declares a field
            node.annotation = ast.Constant(None)
            return node
        return ast.Assign(targets=[node.target], value=self.visit(node.value))


def code_key(text: str) -> str | None:
    """A fingerprint of what text does (its AST minus annotations); None if it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return None
    return ast.dump(_StripAnnotations().visit(tree))


def _string_key(s: str) -> str:
    try:
        return repr(ast.literal_eval(s))  # 'a' and "a" are the same constant
    except Exception:  # f-strings and friends: only unify the quote character
        return s.replace('"""', "'''").replace('"', "'")


def token_key(text: str) -> list[str] | None:
    """Tokens of text without comments, blank lines, indent widths, quote style and
    trailing commas; None if text does not tokenize. For files ast cannot parse."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    out = []
    for t in toks:
        if t.type in (token.NL, token.COMMENT, token.ENDMARKER):
            continue
        if t.type == token.STRING:
            out.append(_string_key(t.string))
        elif t.type in (token.INDENT, token.NEWLINE):
            out.append(token.tok_name[t.type])
        elif t.string in ")]}" and out and out[-1] == ",":
            out[-1] = t.string
        else:
            out.append(t.string)
    return out


def is_format_only(old_text: str, patched_text: str, old_key=None) -> bool:
    """True if patched_text (old_text with one hunk applied) does the same as old_text:
    whitespace, quotes, trailing commas, parentheses, comments or annotations only."""
    if old_text == patched_text:
        return True
    old_key = old_key if old_key is not None else code_key(old_text)
    if old_key is not None:
        new_key = code_key(patched_text)
        if new_key is not None:
            return new_key == old_key
    a, b = token_key(old_text), token_key(patched_text)
    return a is not None and a == b  # cannot tell: call it a real change


# ---------------------------------------------------------------- diff -> steps

def _offsets(lines):
    out = [0]
    for line in lines:
        out.append(out[-1] + len(line))
    return out


def diff_steps(old_text: str, new_text: str) -> tuple[list[dict], dict]:
    """Steps (see docs/traces.md) whose edits, applied in order, turn old_text into new_text.

    Each hunk is split at its first substantive new line t: one step replaces the hunk's
    old lines with its new lines before t and then predicts line t at column 0; the next
    step starts by inserting the rest (t onward). Format-only hunks and hunks without a
    substantive line are applied whole, with "predict": null. Returns (steps, counts).
    """
    old, new = split_lines(old_text), split_lines(new_text)
    o_off, n_off = _offsets(old), _offsets(new)
    old_key = code_key(old_text)
    counts = dict(hunks=0, format_only=0, no_target=0, unsplittable=0, predictions=0)
    steps, doc, pending = [], old_text, None  # pending: (offset, text) still to insert

    def edit(a, b, text):
        nonlocal doc
        e = {"start": list(offset_to_position(doc, a)), "end": list(offset_to_position(doc, b)), "text": text}
        doc = doc[:a] + text + doc[b:]
        return e

    for i1, i2, j1, j2 in hunks(old, new):
        counts["hunks"] += 1
        edits = [edit(pending[0], pending[0], pending[1])] if pending else []
        pending = None
        # everything before this hunk is already new text, so old line i1 sits at n_off[j1]
        a, b = n_off[j1], n_off[j1] + o_off[i2] - o_off[i1]
        patched = old_text[:o_off[i1]] + "".join(new[j1:j2]) + old_text[o_off[i2]:]
        fmt = is_format_only(old_text, patched, old_key)
        t = None if fmt else pick_target(old, new, i1, i2, j1, j2)
        counts["format_only"] += fmt
        counts["no_target"] += not fmt and t is None
        if t is not None:
            # a new line ending in a lone "\r" followed by an old line "\n" would put the
            # cursor inside a "\r\n", which no (line, column) can name
            head = "".join(new[j1:t])
            try:
                offset_to_position(doc[:a] + head + doc[b:], n_off[t])
            except ValueError:
                t = None
                counts["unsplittable"] += 1
        step = {"hunk": hunk_header(i1, i2, j1, j2), "edits": edits, "predict": None, "format_only": fmt}
        if t is None:
            edits.append(edit(a, b, "".join(new[j1:j2])))
        else:
            if head or b > a:  # a pure insertion split at its first line needs no edit yet
                edits.append(edit(a, b, head))
            line, col = offset_to_position(doc, n_off[t])
            step["predict"] = {"line": line, "column": col, "truth": strip_eol(new[t])}
            counts["predictions"] += 1
            pending = (n_off[t], "".join(new[t:j2]))
        steps.append(step)
    if pending:
        steps.append({"hunk": None, "edits": [edit(pending[0], pending[0], pending[1])],
                      "predict": None, "format_only": False})
    replayed = apply_edits(old_text, [e for s in steps for e in s["edits"]])
    if doc != new_text or replayed != new_text:
        raise RuntimeError("bug in bench.hunks.diff_steps: the edits do not rebuild the new file")
    return steps, counts
