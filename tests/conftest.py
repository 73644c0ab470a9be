"""Shared fixtures: the real embedded model (loaded once per session) and a tiny random Llama."""
from __future__ import annotations

import os

import pytest
import torch

# Kernel tests run the Triton kernel under the interpreter when there is no GPU; it must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from livekv.bench.synthetic_models import stdlib_source, tiny_llama, train_tokenizer  # noqa: E402,F401
from livekv.incremental import Engine  # noqa: E402


def excerpt(text: str, first_line: int, n_lines: int) -> str:
    return "".join(text.splitlines(keepends=True)[first_line: first_line + n_lines])


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The embedded SmolLM2-135M, checking the token mirror on every edit; fp32 weights, as the
    servers the tests start (lsp_helpers.EXACT)."""
    return Engine.load(verify_tokens=True, max_new_tokens=8, precision="fp32")


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    """A tiny random Llama with a stdlib-trained tokenizer: no model wheel needed."""
    return tiny_llama(train_tokenizer(), max_new_tokens=8)


@pytest.fixture(scope="session")
def fim_engine() -> Engine:
    """A tiny random Llama whose tokenizer has the FIM tokens: documents open as FIM streams."""
    from livekv.incremental.fim import FIM_TOKENS
    eng = tiny_llama(train_tokenizer(FIM_TOKENS), seed=1, max_new_tokens=6)
    assert eng.fim_ids is not None
    return eng


class CountingForward:
    """Counts the model's forward passes while it runs them for real: `forwards`, each the query
    rows of its passes (one pass a forward alone, several in a batched step)."""

    def __init__(self, model):
        self.model, self.real, self.forwards = model, model.run, []

    def __enter__(self):
        def run(passes, *a, **kw):
            self.forwards.append([p.n for p in passes])
            return self.real(passes, *a, **kw)
        self.model.run = run
        return self

    def __exit__(self, *exc):
        self.model.run = self.real

    @property
    def rows(self) -> list[int]:
        """Each pass's query rows, in order."""
        return [n for f in self.forwards for n in f]
