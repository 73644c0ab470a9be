-- livekv's own ghost text (Neovim 0.7 to 0.11): a suggestion drawn as an extmark at the cursor,
-- its first line as virtual text, the rest as virtual lines. The state of a buffer (`b`) is
-- init.lua's; this module only draws and clears.
local M = {}

local api, fn = vim.api, vim.fn
M.ns = api.nvim_create_namespace("livekv")

-- 0.11 made client methods take self (client:request); 0.7-0.10 have plain functions
function M.call(client, method, ...)
  if fn.has("nvim-0.11") == 1 then
    return client[method](client, ...)
  end
  return client[method](...)
end

function M.clear(buf, b)
  if b then
    b.shown = nil
  end
  if api.nvim_buf_is_valid(buf) then
    api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
  end
end

function M.show(buf, b, text, tick, row, col)
  local lines = vim.split(text, "\n", { plain = true })
  -- virtual text draws a tab as ^I: show the spaces it would take (the buffer gets the tab)
  local spaces = string.rep(" ", vim.bo[buf].tabstop)
  local function chunk(s)
    return { { (s:gsub("\t", spaces)), "LivekvGhost" } }
  end
  local opts = { hl_mode = "combine" }
  if lines[1] ~= "" then
    opts.virt_text = chunk(lines[1])
    if fn.has("nvim-0.10") == 1 then
      opts.virt_text_pos = "inline"
    else
      -- at the end of the line, overlay draws right at the cursor; mid-line it would hide the
      -- rest of the line, so the suggestion goes after it
      local line = api.nvim_buf_get_lines(buf, row, row + 1, true)[1]
      opts.virt_text_pos = col >= #line and "overlay" or "eol"
    end
  end
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      opts.virt_lines[#opts.virt_lines + 1] = chunk(lines[i])
    end
  end
  M.clear(buf, b)
  api.nvim_buf_set_extmark(buf, M.ns, row, col, opts)
  b.shown = { text = text, tick = tick, row = row, col = col }
end

return M
