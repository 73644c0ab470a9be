"""What the experience tests over LSP share: one server per module, initialized with these
settings (test_lsp_experience.py, test_lsp_stops.py)."""
from __future__ import annotations

import pytest_lsp
from lsprotocol import types as T
from pytest_lsp import ClientServerConfig, LanguageClient

from lsp_helpers import configure, server_command, server_env

MAX_NEW = 8
# repoContext off: every test's documents stay open in the one server; as each other's context
# groups they would change the completions compared with a fresh Engine.open (test_lsp_repo.py)
DEFAULTS = {"maxNewTokens": MAX_NEW, "maxPromptMs": 0, "maxPredictMs": 0, "prefetch": True, "candidates": 1,
            "multiline": True, "maxLines": 8, "repoContext": False}
@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=server_command(), server_env=server_env()))
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(T.InitializeParams(capabilities=T.ClientCapabilities(),
                                                           initialization_options={"livekv": DEFAULTS}))
    yield
    await lsp_client.shutdown_session()


def restore(c: LanguageClient) -> None:
    configure(c, {"livekv": DEFAULTS})


def texts(items) -> list[str]:
    return [i.insert_text for i in items]
