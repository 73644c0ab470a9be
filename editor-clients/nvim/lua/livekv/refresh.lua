-- Asking again once the server can answer. The first keystroke of a session usually comes while
-- `livekv lsp` is still starting: before it has answered `initialize` there is no client to ask
-- (init.lua's request() has nothing to send), and a request it answers while the model loads or
-- the file's first encode runs may come back empty (under maxPromptMs). Either way the person,
-- who typed once and waits, would see nothing until the next key. So the plugin asks again:
--   * when the client attaches to the buffer (it has just initialized and sent didOpen), and
--   * on the server's `livekv/refresh` notification ({uri}), which it sends once the document a
--     completion could not be answered for is encoded and the model is loaded.
-- Only for the buffer the person is in, in insert mode, with nothing shown and nothing in flight:
-- anything else means they moved on, or an answer is already coming.
local M = {}

local api = vim.api

-- buffers: init.lua's per-buffer state; request(buf): its request path (debounce skipped: the
-- person has already paused); native(): whether Neovim's own inline completion asks instead
local function waiting(buffers, buf, native)
  local b = buffers[buf]
  return b ~= nil and not native() and api.nvim_buf_is_valid(buf) and api.nvim_get_current_buf() == buf
    and api.nvim_get_mode().mode == "i" and b.shown == nil and b.pending == nil
end

-- count: the state's counter to bump (for tests and bug reports)
local function ask(buffers, request, native, buf, count)
  -- scheduled: a notification handler or on_attach runs inside the client's callbacks (0.7 sends
  -- the buffer's didOpen only after on_init), and the request must follow what they send
  vim.schedule(function()
    if waiting(buffers, buf, native) then
      buffers[buf][count] = (buffers[buf][count] or 0) + 1
      request(buf)
    end
  end)
end

--- The client config's `handlers` entry for livekv/refresh.
function M.handlers(buffers, request, native)
  return {
    ["livekv/refresh"] = function(_, params)
      local uri = type(params) == "table" and params.uri
      for buf in pairs(buffers) do
        if api.nvim_buf_is_valid(buf) and vim.uri_from_bufnr(buf) == uri then
          ask(buffers, request, native, buf, "refreshes")
        end
      end
    end,
  }
end

--- The client config's `on_attach`: a key typed before the server answered `initialize` asked
--- nothing; ask now, if the person is still waiting in that buffer.
function M.on_attach(buffers, request, native)
  return function(_, buf)
    ask(buffers, request, native, buf, "attach_asks")
  end
end

return M
