-- livekv for Neovim: ghost text from `livekv lsp`, the language server that keeps a live KV cache
-- of the file and updates it on every keystroke.
--
--   require("livekv").setup({ cmd = { "livekv", "lsp" }, debounce_ms = 120 })
--
-- Neovim 0.12+ has inline completion built in (vim.lsp.inline_completion): the plugin starts the
-- server and lets Neovim show and accept its suggestions. Older versions (0.7 and up) get the
-- plugin's own ghost text, from textDocument/completion: after `debounce_ms` without typing in
-- insert mode it asks for the suggestion at the cursor and shows it as an extmark (first line as
-- virtual text at the cursor, the rest as virtual lines). <Tab> inserts it, or is a plain <Tab>
-- when nothing is shown; any other key clears it. A request made stale by typing or moving is
-- cancelled ($/cancelRequest); one the server could not answer yet is made again (refresh.lua).
local M = {}

local ghost, refresh, stats = require("livekv.ghost"), require("livekv.refresh"), require("livekv.stats")
local api, fn = vim.api, vim.fn
local ns, call = ghost.ns, ghost.call

local config = {
  cmd = { "livekv", "lsp" },
  debounce_ms = 120,
  filetypes = { "python" },
  -- initializationOptions.livekv, as they are: model, strategy, maxNewTokens, device, dtype,
  -- ... (the server refuses all of them when one key is unknown to it)
  settings = {},
  accept_key = "<Tab>", -- false: map a key yourself to require("livekv").accept() (true: inserted)
  native = true,         -- use vim.lsp.inline_completion where Neovim has it (0.12+)
}

local client_id, last_exit -- last_exit: the server's exit code, once it has exited
-- per buffer: timer, pending request, shown suggestion, counters
local buffers = {}

local function native()
  return config.native and vim.lsp.inline_completion ~= nil
end

local function client()
  local c = client_id and vim.lsp.get_client_by_id(client_id)
  if c and c.initialized and not call(c, "is_stopped") then
    return c
  end
end

-- (changedtick, row, col) of the cursor in buf: a suggestion belongs to exactly this state
local function here(buf)
  local cursor = api.nvim_win_get_cursor(0)
  return api.nvim_buf_get_changedtick(buf), cursor[1] - 1, cursor[2]
end

local function dismiss(buf)
  ghost.clear(buf, buffers[buf])
end

local function cancel(buf)
  local b = buffers[buf]
  if not b then
    return
  end
  b.timer:stop()
  local p = b.pending
  b.pending = nil
  local c = p and vim.lsp.get_client_by_id(p.client)
  if c then
    call(c, "cancel_request", p.id)
    b.cancels = b.cancels + 1
  end
end

local function insert_mode(buf)
  return api.nvim_get_current_buf() == buf and api.nvim_get_mode().mode == "i"
end

local function request(buf)
  local b, c = buffers[buf], client()
  if not (b and c and insert_mode(buf)) then
    return
  end
  cancel(buf)
  local tick, row, col = here(buf)
  local req = { client = c.id }
  local params = vim.lsp.util.make_position_params(0, c.offset_encoding)
  local ok, id = call(c, "request", "textDocument/completion", params, function(err, result)
    if b.pending ~= req then
      return -- cancelled: the text or the cursor moved on
    end
    b.pending = nil
    local item = result and (result.items or result)[1]
    local text = item and (item.textEdit and item.textEdit.newText or item.insertText)
    if err or not text or text == "" or not insert_mode(buf) then
      return
    end
    local t, r, col2 = here(buf)
    if t == tick and r == row and col2 == col then
      ghost.show(buf, buffers[buf], text, tick, row, col)
    end
  end, buf)
  if ok then
    req.id = id
    b.pending = req
    b.requests = b.requests + 1
  end
end

-- A key was typed, the text changed or the cursor moved: drop what is shown and in flight,
-- and ask again once typing pauses.
local function on_activity(buf)
  local b = buffers[buf]
  dismiss(buf)
  cancel(buf)
  b.timer:start(config.debounce_ms, 0, vim.schedule_wrap(function()
    request(buf)
  end))
end

local function current(buf)
  local b = buffers[buf]
  local s = b and b.shown
  if s then
    local tick, row, col = here(buf)
    if tick == s.tick and row == s.row and col == s.col then
      return s
    end
  end
end

--- Insert the suggestion shown at the cursor (current buffer). Returns false when there is none.
function M.accept()
  local buf = api.nvim_get_current_buf()
  if native() then
    return vim.lsp.inline_completion.get({ bufnr = buf }) and true or false
  end
  local b = buffers[buf]
  -- the accept key's mapping took the suggestion as the key came in; anything else clears it
  local s = (b and b.accepting) or current(buf)
  if b then
    b.accepting = nil
  end
  local tick, row, col = here(buf)
  if not s or s.tick ~= tick or s.row ~= row or s.col ~= col then
    return false
  end
  dismiss(buf)
  local lines = vim.split(s.text, "\n", { plain = true })
  api.nvim_buf_set_text(buf, row, col, row, col, lines)
  api.nvim_win_set_cursor(0, { row + #lines, #lines == 1 and col + #lines[1] or #lines[#lines] })
  return true
end

local function map_accept(buf)
  if not config.accept_key then
    return
  end
  if native() then
    vim.keymap.set("i", config.accept_key, function()
      if not M.accept() then
        api.nvim_feedkeys(api.nvim_replace_termcodes(config.accept_key, true, false, true), "ni", false)
      end
    end, { buffer = buf, desc = "livekv: accept the suggestion" })
    return
  end
  -- an expr mapping cannot change the buffer: it returns the keys that will, in order with any
  -- keys typed after it: a plain <Tab> (noremap), or <Cmd> accept
  vim.keymap.set("i", config.accept_key, function()
    local s = current(buf)
    if not s then
      return config.accept_key
    end
    buffers[buf].accepting = s
    return "<Cmd>lua require('livekv').accept()<CR>"
  end, { buffer = buf, expr = true, desc = "livekv: accept the suggestion" })
end

local function client_config()
  return {
    name = "livekv",
    cmd = config.cmd,
    root_dir = fn.getcwd(),
    init_options = next(config.settings) and { livekv = config.settings } or nil,
    -- every keystroke is an edit of the live cache: send it now, not in a batch
    flags = { debounce_text_changes = 0 },
    handlers = refresh.handlers(buffers, request, native),
    on_attach = refresh.on_attach(buffers, request, native),
    on_exit = function(code)
      client_id, last_exit = nil, code
      if code ~= 0 then
        vim.schedule(function()
          vim.notify(("livekv: `%s` exited with code %d (see :LspLog)"):format(table.concat(config.cmd, " "), code),
                     vim.log.levels.WARN)
        end)
      end
    end,
  }
end

local group = api.nvim_create_augroup("livekv", { clear = true })

local function detach(buf)
  local b = buffers[buf]
  buffers[buf] = nil
  if b then
    b.timer:stop()
    b.timer:close()
  end
  api.nvim_clear_autocmds({ group = group, buffer = buf })
end

local function attach(buf)
  -- attached already, unless the server has exited since (then :edit starts it again)
  if (buffers[buf] and client_id) or not api.nvim_buf_is_valid(buf) or vim.bo[buf].buftype ~= "" then
    return
  end
  detach(buf)
  if fn.executable(config.cmd[1]) ~= 1 then
    vim.notify(("livekv: %s is not executable: install livekv (pip install -e .) or pass "
                .. "setup({ cmd = { '/path/to/livekv', 'lsp' } })"):format(config.cmd[1]), vim.log.levels.ERROR)
    return
  end
  if vim.lsp.start then -- 0.8+: reuses the running client (same name and root)
    api.nvim_buf_call(buf, function()
      client_id = vim.lsp.start(client_config())
    end)
  else
    if not (client_id and vim.lsp.get_client_by_id(client_id)) then
      client_id = vim.lsp.start_client(client_config())
    end
    vim.lsp.buf_attach_client(buf, client_id)
  end
  if not client_id then
    return
  end
  buffers[buf] = { timer = (vim.uv or vim.loop).new_timer(), requests = 0, cancels = 0 }
  map_accept(buf)
  if native() then
    vim.lsp.inline_completion.enable(true, { bufnr = buf })
    return
  end
  -- TextChangedP: typing while a completion menu (another plugin's) is open
  api.nvim_create_autocmd({ "InsertEnter", "TextChangedI", "TextChangedP", "CursorMovedI" }, {
    group = group, buffer = buf, callback = function() on_activity(buf) end,
  })
  api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group, buffer = buf, callback = function() dismiss(buf); cancel(buf) end,
  })
  api.nvim_create_autocmd("BufUnload", {
    group = group, buffer = buf, callback = function() detach(buf) end,
  })
end

--- The server's stats for buf (tokens, tokens_encoded_last_edit, edit_ms_last, ...) to cb(stats, err).
function M.stats(buf, cb)
  return stats.stats(client, call, buf, cb)
end

--- For tests and bug reports: what the plugin holds for buf.
function M.state(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local b = buffers[buf]
  return b and { shown = b.shown and b.shown.text, pending = b.pending ~= nil, requests = b.requests,
                 cancels = b.cancels, refreshes = b.refreshes or 0, attach_asks = b.attach_asks or 0,
                 native = native(), client_id = client_id, exit_code = last_exit }
end

function M.setup(opts)
  config = vim.tbl_deep_extend("force", config, opts or {})
  vim.cmd("highlight default link LivekvGhost Comment")
  for buf in pairs(buffers) do -- setup() again: attach afresh with the new options
    detach(buf)
  end
  api.nvim_clear_autocmds({ group = group })
  api.nvim_create_autocmd("FileType", {
    group = group, pattern = config.filetypes, callback = function(args) attach(args.buf) end,
  })
  api.nvim_create_autocmd("ColorScheme", {
    group = group, callback = function() vim.cmd("highlight default link LivekvGhost Comment") end,
  })
  -- any key clears the ghost text, once it has been handled (the accept key's mapping has
  -- taken the suggestion by then)
  vim.on_key(function()
    for buf, b in pairs(buffers) do
      local s = b.shown
      if s then
        vim.schedule(function()
          if b.shown == s then
            dismiss(buf)
          end
        end)
      end
    end
  end, ns)
  stats.command(client, call)
  for _, buf in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(buf) and vim.tbl_contains(config.filetypes, vim.bo[buf].filetype) then
      attach(buf)
    end
  end
end

return M
