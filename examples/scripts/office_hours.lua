-- An office-hours redirect server (issue 24's second policy): calls to our domain are
-- redirected (302) to the office's desk phones during opening hours, in the office's time
-- zone with its summer time, and to the on-call mobile otherwise. Closing the office for a
-- day is `moonroute ctl kv set office:closed 1 86400` (and `ctl kv del office:closed`).
-- Tests: moonroute test --lua examples/scripts/office_hours_test.lua

local ZONE = "Europe/Paris"
local OPEN = "Mon-Fri 08:00-12:30,13:30-18:00; Sat 09:00-12:00"
local OFFICE = "sip:office@127.0.0.1:5060" -- the AOR the desk phones register
local ON_CALL = "sip:+33600000000@127.0.0.1:5091" -- stand-in: the mobile, through a gateway

function on_request(req)
  if req:is_method("ACK") then
    return req:drop()
  end
  if req:is_method("REGISTER") then
    if not req:authorize() then
      return req:auth_challenge()
    end
    if not req:check_from() then
      return req:reply(403, "Forbidden auth ID")
    end
    return req:save("location")
  end
  if not req:is_method("INVITE") or req:has_to_tag() then
    return req:reply(405, "Method Not Allowed")
  end
  if not req:is_myself(req.ruri) then
    return req:reply(403, "Forbidden")
  end
  local open = sip.time.match(OPEN, ZONE) and not sip.kv.get("office:closed")
  if open and req:lookup("location", OFFICE) > 0 then
    return req:redirect(302)
  end
  return req:reply(302, "Moved Temporarily", { Contact = "<" .. ON_CALL .. ">" })
end
