-- Headless Neovim for tests/test_nvim_plugin.py: this checkout's plugin, set up as a person
-- would, with the server command from $LIVEKV_CMD (a JSON list).
local here = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h")
vim.opt.runtimepath:prepend(vim.fn.fnamemodify(here, ":h"))
-- indent plugins re-indent lines as they are typed; 'autoindent' (copy the line above) stays,
-- so the typed text does not depend on the Python indent script of this Neovim version
vim.cmd("filetype indent off")
require("livekv").setup({
  cmd = vim.fn.json_decode(os.getenv("LIVEKV_CMD")),
  debounce_ms = 120,
  -- maxPromptMs only when set (tonumber(nil) is nil): the server's default otherwise
  settings = { maxNewTokens = tonumber(os.getenv("LIVEKV_MAX_NEW_TOKENS") or "6"),
               maxPromptMs = tonumber(os.getenv("LIVEKV_MAX_PROMPT_MS") or "") },
  native = os.getenv("LIVEKV_NATIVE") ~= "0",
})
-- the test reads the messages sent ($/cancelRequest) from the LSP log
vim.lsp.set_log_level("debug")
