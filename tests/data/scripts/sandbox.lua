-- The sandbox's bytecode probes (tests/scripts.rs). The test replaces the placeholder below
-- with a real binary chunk of the embedded Lua (made by string.dump outside the sandbox),
-- which an unsandboxed state loads and runs. The X-Test header picks the probe.
local BYTECODE = "@BYTECODE@"

function on_request(req)
  local what = req:header("X-Test")
  if what == "dump" then
    local chunk = string.dump(function() return 1 end)
    return req:reply(200, "Dumped " .. #chunk)
  elseif what == "bytecode" then
    local escaped = assert(load(BYTECODE, "=probe", "b"))
    return req:reply(200, escaped())
  elseif what == "reader" then
    local given = false
    local function reader()
      if given then return nil end
      given = true
      return BYTECODE
    end
    local escaped = assert(load(reader, "=probe", "bt"))
    return req:reply(200, escaped())
  elseif what == "text" then
    local chunk = assert(load("return ...", "=probe", "b"))
    return req:reply(200, chunk("Text loads"))
  end
  return req:reply(200, "Fine")
end
