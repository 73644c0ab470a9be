-- livekv/stats: the server's stats for a buffer (livekv/stats), and :LivekvStats, which prints
-- the last edit's cost.
local M = {}

local api = vim.api

--- The server's stats for buf (tokens, tokens_encoded_last_edit, edit_ms_last, ...) to cb(stats, err).
function M.stats(client, call, buf, cb)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  local c = client()
  if not c then
    return cb(nil, "livekv is not running")
  end
  call(c, "request", "livekv/stats", { textDocument = { uri = vim.uri_from_bufnr(buf) } }, function(err, result)
    cb(result, err and err.message)
  end, buf)
end

--- :LivekvStats, with the plugin's client getter and call shim.
function M.command(client, call)
  api.nvim_create_user_command("LivekvStats", function()
    M.stats(client, call, 0, function(s, err)
      if not s then
        return vim.notify("livekv: " .. tostring(err), vim.log.levels.WARN)
      end
      local ms = tonumber(s.edit_ms_last)
      print(("livekv: %s tokens; last edit: %s encoded, %s keys rotated, %s ms (a full re-encode: %s tokens)")
        :format(s.tokens, s.tokens_encoded_last_edit, s.keys_rotated_last_edit, ms and ("%.1f"):format(ms) or "?",
                s.full_reencode_tokens))
    end)
  end, { desc = "livekv: the last edit's cost" })
end

return M
