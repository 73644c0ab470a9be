"""Where a suggestion ends: at the end of its line, or at the end of the block it opens, and never
with unbalanced brackets or quotes.

A Stop turns the raw decoded text into (text, done): the suggestion as it would be if decoding
ended now, and whether decoding can end. `text` only ever grows as tokens arrive, so it can be
streamed: what was sent is never taken back. Both trims of brackets an editor auto-closed (the
context's, and the suggestion's own against the rest of the line) happen here, so every server
and `livekv complete` answer the same at the same cursor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .lines import BREAK as _NL, line_span

OPEN = {"(": ")", "[": "]", "{": "}"}
CLOSE = {")": "(", "]": "[", "}": "{"}
_BLOCK_HEADER = re.compile(r"^\s*(async\s+)?(def|class|if|elif|else|for|while|with|try|except|finally|match|case)\b.*:\s*$")


@dataclass
class Brackets:
    """A bracket stack that skips strings and comments."""
    stack: list = field(default_factory=list)
    quote: str | None = None    # the open string's delimiter: ' " ''' or \"\"\"
    comment: bool = False

    def copy(self) -> "Brackets":
        return Brackets(list(self.stack), self.quote, self.comment)

    def feed(self, s: str, start: int = 0, points: list | None = None, base: int = 0) -> int | None:
        """Scan s[start:]. Returns the index of the first closing bracket that closes nothing
        (the scan stops before it), else None. When `points` is given, appends every index i
        (after char i-1) where no bracket or string opened during this scan is still open;
        `base` is the stack depth the scan started with."""
        i, n = start, len(s)
        quote0 = self.quote
        while i < n:
            c = s[i]
            if self.comment:
                if c in "\r\n":
                    self.comment = False
            elif self.quote is not None:
                q = self.quote
                if c == "\\":
                    i += 1
                elif s.startswith(q, i):
                    self.quote = None
                    i += len(q) - 1
                elif len(q) == 1 and c in "\r\n":
                    self.quote = None  # an unterminated one-line string ends with its line
            elif c == "#":
                self.comment = True
            elif c in "'\"":
                if i + 2 == n and s[i + 1] == c:
                    # two quotes at the very end may yet become three: leave it open for now
                    self.quote = c
                    return None
                self.quote = c * 3 if s.startswith(c * 3, i) else c
                i += len(self.quote) - 1
            elif c in OPEN:
                self.stack.append(c)
            elif c in CLOSE:
                if not self.stack or self.stack[-1] != CLOSE[c]:
                    return i
                self.stack.pop()
                base = min(base, len(self.stack))  # closing a bracket of the context is fine
            i += 1
            # inside a string the context already had open (a docstring, say) every char is a point
            if points is not None and len(self.stack) <= base and self.quote in (None, quote0):
                points.append(i)
        return None


def balanced_prefix(text: str, context: Brackets) -> str:
    """The longest prefix of text that ends with every bracket and string it opened closed, and
    that closes no bracket the context does not have open."""
    scan = context.copy()
    points = [0]
    scan.feed(text, points=points, base=len(scan.stack))
    return text[: points[-1]]


def indent_width(line: str) -> int:
    return len(line.expandtabs(8)) - len(line.expandtabs(8).lstrip(" "))


@dataclass
class Stop:
    """The stop policy of one completion."""
    mode: str = "line"                 # "line", or "block": the suggestion may run to the block's end
    header_indent: int = 0             # indentation of the line that opens the block
    max_lines: int = 8
    leading_newline: bool = False      # cursor at the end of a finished line: the suggestion is the next line
    context: Brackets = field(default_factory=Brackets)
    rest: str = ""                     # the rest of the cursor's line, which the suggestion goes before
    line_context: Brackets | None = None  # what the statement has open at the cursor (for `fit`)

    def cut(self, raw: str) -> tuple[str, bool]:
        """(text, done) for the raw decoded text so far."""
        if self.mode == "block":
            text, done = self._block(raw)
        else:
            text, done = self._line(raw)
        return self.fit(balanced_prefix(text, self.context)), done

    def fit(self, text: str) -> str:
        """text fitted to the rest of the line (fit_to_line); as is at the end of a line."""
        if not self.rest.strip() or self.line_context is None:
            return text
        return fit_to_line(self.line_context, text, self.rest)

    def _line(self, raw: str) -> tuple[str, bool]:
        start = 0
        if self.leading_newline:
            m = _NL.match(raw, len(raw) - len(raw.lstrip(" \t")))  # blanks, then a line break
            if m is None and raw.strip(" \t") == "":
                return "", False     # only blanks so far: the line has not started
            if m is not None:
                start = m.end()
        m = _NL.search(raw, start)
        if m is None:
            return raw, False
        return raw[: m.start()], True

    def _block(self, raw: str) -> tuple[str, bool]:
        lines = _NL.split(raw)
        seps = [m.group() for m in _NL.finditer(raw)]
        # lines[0] is the rest of the header line (normally empty); the body follows
        kept, body, done = lines[0], 0, False
        pending = ""                              # blank lines, kept only if the body goes on
        for i, line in enumerate(lines[1:], start=1):
            complete = i < len(lines) - 1
            if line.strip() == "":
                if complete:
                    pending += seps[i - 1] + line
                continue
            if indent_width(line) <= self.header_indent:  # dedent: the block is over
                done = True
                break
            kept += pending + seps[i - 1] + line
            pending = ""
            if complete:
                body += 1
                if body >= self.max_lines:
                    done = True
                    break
        if not lines[0].strip() == "" and len(lines) > 1:
            # text after the colon on the header line: not a block suggestion after all
            return lines[0], True
        return kept, done


def fit_to_line(context: Brackets, text: str, rest: str) -> str:
    """The longest prefix of text that, followed by the rest of the line, closes no bracket or
    string that the rest closes anyway. Editors auto-close brackets: in `print(len(|))` the
    engine, which sees only the text before the cursor, suggests `items))`; here `items`."""
    alone = context.copy()
    if not rest.strip() or alone.feed(rest) is not None:
        return text  # nothing after the cursor, or a line already broken: leave it to the engine
    for i in range(len(text), -1, -1):
        b = context.copy()
        if b.feed(text[:i] + rest) is None and b.quote == alone.quote and len(b.stack) <= len(alone.stack):
            return text[:i]
    return ""


def stop_policy(doc, c: int, extra: str = "", multiline: bool = True, max_lines: int | None = None) -> Stop:
    """The stop policy at char offset c of doc: a block suggestion after a block-opening colon
    with nothing after the cursor, else the rest of the line (the next line when this one is
    finished). `extra` is text taken as typed at the cursor (a prefetch)."""
    cfg, text = doc.engine.config, doc.state.text
    line, col = doc.position(c)
    line_start = c - col
    rest = line_rest(doc, c)
    virtual = _NL.split(text[line_start:c] + extra)[-1]  # the cursor's line so far
    at_eol = rest.strip() == ""
    opens = False
    if multiline and at_eol and virtual.rstrip().endswith(":"):
        tree = doc.syntax_tree() if not extra else None
        opens = tree.opens_block(c) if tree is not None else bool(_BLOCK_HEADER.match(virtual))
    brackets = Brackets()
    brackets.feed(text[doc.statement_start(c): c] + extra)
    line_context = brackets.copy()
    # Brackets the rest of the line closes (an editor's auto-closed ")") are not the suggestion's
    # to close: with any of them, it may close none of the context's.
    after = Brackets(list(brackets.stack), brackets.quote)
    if after.feed(rest) is not None or len(after.stack) < len(brackets.stack):
        brackets = Brackets(quote=brackets.quote)
    return Stop(mode="block" if opens else "line", header_indent=indent_width(virtual),
                max_lines=cfg.max_lines if max_lines is None else max_lines, leading_newline=at_eol and virtual.strip() != "" and not opens,
                context=brackets, rest=rest, line_context=line_context)


def line_rest(doc, c: int) -> str:
    """The text after char offset c on its line, the line break excluded."""
    return doc.text[c: line_span(doc.state.lines, doc.text, doc.position(c)[0])[1]]
