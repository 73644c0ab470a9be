"""The completion entry points of a Document: suggest, stream, complete and prefetch, over
decode.py's greedy decoder, with typed-ahead reuse and the per-document completion counters.

Cursors are (line, column), the column in code units of `encoding` (code points by default,
"utf-16" as LSP and browsers count, or "utf-8")."""
from __future__ import annotations

from typing import Callable, Iterator

from . import batch
from .batch import Stepper
from .decode import Completion, decoding, teacher_forced
from .stops import line_rest, stop_policy


class Completer:
    """Mixed into Document: everything here reads the document and its cache, and decodes."""

    def suggest(self, line: int, col: int, n: int = 1, max_new_tokens: int | None = None,
                should_stop: Callable[[], bool] | None = None, extra: str = "", reuse: bool = False,
                on_piece: Callable[[str], None] | None = None, encoding: str = "utf-32", **caps) -> Completion:
        """Up to n distinct suggestions at (line, col), from one batched decode: `suggesting`
        run alone."""
        return batch.alone(self.engine.model, self.suggesting(line, col, n, max_new_tokens, should_stop, extra, reuse,
                                                              on_piece, encoding, **caps))

    def suggesting(self, line: int, col: int, n: int = 1, max_new_tokens: int | None = None,
                   should_stop: Callable[[], bool] | None = None, extra: str = "", reuse: bool = False,
                   on_piece: Callable[[str], None] | None = None, encoding: str = "utf-32", **caps) -> Stepper:
        """suggest as a stepper (batch.py), for a scheduler to run with other completions.

        reuse: answer from the suggestion last shown when the person has been typing it (no
        model call), and remember this one. extra: text taken as typed at the cursor first
        (prefetch). caps: max_prompt_ms, max_predict_ms, multiline (default from the config).
        on_piece(text) streams candidate 0 of a decode as it becomes final (a reused answer is
        not decoded: it comes whole, as the returned text)."""
        c = self.offset(line, col, encoding)
        if reuse and not extra and n == 1:
            rest = self.typeahead.lookup(self.text, c)
            if rest is not None and line_rest(self, c).strip():  # fitted as a decode would be (Stop.fit)
                rest = stop_policy(self, c).fit(rest)
            if rest is not None:
                comp = Completion(texts=[rest], stop="typed_ahead", reused=True)
                self._stats["last_completion"] = comp.summary()
                return comp
        comp = yield from self._decoding(c, n, max_new_tokens, should_stop, extra, on_piece, **caps)
        if reuse and not extra and comp.stop not in ("cancelled", "prompt_cap", "predict_cap"):
            self.typeahead.remember(self.text, c, comp.text)
        return comp

    def prefetch(self, should_stop: Callable[[], bool] | None = None, **caps) -> str | None:
        """Decode the line after the suggestion last shown, as if it had been accepted, and
        append it to that suggestion for typed-ahead reuse. Returns the prefetched text."""
        shown = self.typeahead.shown
        if shown is None or not self.text.startswith(shown.before) or not shown.text.strip():
            return None
        line, col = self.position(shown.anchor)
        comp = self.suggest(line, col, extra=shown.text, should_stop=should_stop, record=False, **caps)
        if comp.stop in ("cancelled", "prompt_cap") or not comp.text:
            return None
        return comp.text if self.typeahead.extend(shown.text, comp.text) else None

    def stream(self, line: int, col: int, max_new_tokens: int | None = None,
               should_stop: Callable[[], bool] | None = None, encoding: str = "utf-32", **caps) -> Iterator[str]:
        """Yield the completion at (line, col) piece by piece (one per decoded token at most)."""
        pieces: list[str] = []
        steps = self._decoding(self.offset(line, col, encoding), 1, max_new_tokens, should_stop, "", pieces.append,
                               **caps)
        yield from batch.streaming(self.engine.model, steps, pieces)

    def complete(self, line: int, col: int, max_new_tokens: int | None = None,
                 should_stop: Callable[[], bool] | None = None, encoding: str = "utf-32", **caps) -> str:
        """The text to insert at (line, col): greedy, to the end of the line (or of the block a
        colon just opened)."""
        return self.suggest(line, col, 1, max_new_tokens, should_stop, encoding=encoding, **caps).text

    def teacher_forced(self, line: int, col: int, forced: list[int], encoding: str = "utf-32"):
        """Log-probabilities (len(forced) + 1, V) at (line, col): of the first token and of each
        next one after the forced tokens (decode.teacher_forced). No counter or cache of the
        completion machinery changes; dirty tokens before the cursor get encoded."""
        return teacher_forced(self, self.offset(line, col, encoding), forced)

    def _decoding(self, c, n, max_new_tokens, should_stop, extra, on_piece, max_prompt_ms=None,
                  max_predict_ms=None, multiline=None, max_lines=None, record=True) -> Stepper:
        cfg = self.engine.config
        max_new = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        checks = [("max_new_tokens", max_new), ("the number of candidates", n)]
        for name, v in checks + ([("max_lines", max_lines)] if max_lines is not None else []):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {v!r}")
        comp = yield from decoding(
            self, c, n, max_new, should_stop, extra,
            max_prompt_ms=cfg.max_prompt_ms if max_prompt_ms is None else max_prompt_ms,
            max_predict_ms=cfg.max_predict_ms if max_predict_ms is None else max_predict_ms,
            multiline=cfg.multiline if multiline is None else multiline, max_lines=max_lines, on_piece=on_piece)
        if record:  # a prefetch is not a completion anybody asked for
            self._stats["completions"] += 1
            self._stats["prompt_caps"] += comp.incomplete
            self._stats["predict_caps"] += comp.capped
            self._stats["heal_drafts"] += comp.drafted
            self._stats["last_completion"] = comp.summary()
        else:
            self._stats["last_prefetch"] = comp.summary()
        return comp
