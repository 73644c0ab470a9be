-- Headless Neovim 0.7 as a real LSP client of `livekv lsp` (run by tests/test_nvim_lsp.py).
-- Opens $LIVEKV_SPEC's file, edits it through the buffer API, asks for textDocument/completion
-- and writes what happened to $LIVEKV_OUT as JSON. Neovim 0.7 has no vim.lsp.start: use
-- start_client + buf_attach_client, and no didChange debounce so every edit is sent at once.

local function read(path)
  local f = assert(io.open(path, "r"))
  local s = f:read("*a")
  f:close()
  return s
end

local function finish(result)
  local f = assert(io.open(os.getenv("LIVEKV_OUT"), "w"))
  f:write(vim.fn.json_encode(result))
  f:close()
  vim.cmd("qa!")
end

local function run()
  local spec = vim.fn.json_decode(read(os.getenv("LIVEKV_SPEC")))
  vim.cmd("edit " .. vim.fn.fnameescape(spec.file))
  local buf = vim.api.nvim_get_current_buf()
  local id = vim.lsp.start_client({
    name = "livekv",
    cmd = spec.cmd,
    root_dir = vim.fn.fnamemodify(spec.file, ":h"),
    flags = { debounce_text_changes = 0 },
  })
  assert(id, "vim.lsp.start_client could not start " .. table.concat(spec.cmd, " "))
  vim.lsp.buf_attach_client(buf, id)
  local client = vim.lsp.get_client_by_id(id)
  assert(vim.wait(120000, function() return client.initialized end, 20), "livekv did not initialize")

  -- edits through the buffer, as a person (or a plugin) makes them; columns are bytes here
  for _, e in ipairs(spec.edits) do
    if e.lines_from then
      vim.api.nvim_buf_set_lines(buf, e.lines_from, e.lines_to, true, e.lines)
    else
      vim.api.nvim_buf_set_text(buf, e.row, e.col, e.end_row, e.end_col, e.lines)
    end
  end

  -- the cursor at (row, byte column); the client converts it to its offset encoding (UTF-16)
  local line = vim.api.nvim_buf_get_lines(buf, spec.row, spec.row + 1, true)[1]
  local _, utf16 = vim.str_utfindex(line, spec.col)
  local params = { textDocument = vim.lsp.util.make_text_document_params(buf),
                   position = { line = spec.row, character = utf16 } }
  -- a request flushes pending didChange notifications first
  local replies, err = vim.lsp.buf_request_sync(buf, "textDocument/completion", params, 120000)
  assert(replies and replies[id], "no completion reply: " .. tostring(err))
  local stats = vim.lsp.buf_request_sync(buf, "livekv/stats", { textDocument = params.textDocument }, 60000)
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, true)

  client.stop()
  vim.wait(10000, function() return client.is_stopped() end, 20)
  finish({
    completion = replies[id].result,
    error = replies[id].err,
    stats = stats and stats[id] and stats[id].result,
    position = params.position,
    text = table.concat(lines, "\n") .. "\n",
  })
end

local ok, err = pcall(run)
if not ok then
  finish({ failure = tostring(err) })
end
