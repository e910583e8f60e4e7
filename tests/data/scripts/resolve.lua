-- sip.resolve end to end (tests/scripts.rs). X-Hop names a next hop; on_request resolves it
-- (the hook is suspended until the answer arrives) and, by X-Test:
--   "relay"  relays statefully to the first address (the default),
--   "show"   answers 200 with the addresses in the reason phrase,
--   "twice"  resolves twice before relaying (state survives both suspensions),
--   "bad"    resolves a tel: URI, which is an error at this line (500).
-- on_reply tries sip.resolve, which only on_request may call: that error is logged and the
-- response passes on.

function on_request(req)
  local test = req:header("X-Test") or "relay"
  local hop = req:header("X-Hop")
  if test == "bad" then
    sip.resolve("tel:+15551234")
  end
  req.vars.before = "kept"
  local targets, err = sip.resolve(hop)
  if not targets then
    return req:reply(502, "Unresolved: " .. err)
  end
  if test == "show" then
    local uris = {}
    for i, t in ipairs(targets) do
      uris[i] = t.uri .. "|" .. t.transport .. "|" .. t.host .. "|" .. t.port
    end
    return req:reply(200, table.concat(uris, " "))
  end
  if test == "twice" then
    targets = sip.resolve(hop)
  end
  req:set_header("X-Vars", req.vars.before)
  return req:t_relay(targets[1].uri)
end

function on_reply(req, res)
  sip.resolve("sip:127.0.0.1")
end
