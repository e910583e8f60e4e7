-- moonroute redirect server (RFC 3261 §8.3): a registrar that answers every other request
-- for its users with 302 Moved Temporarily listing their registered contacts, instead of
-- relaying it. The caller then tries the contacts itself.
--
-- Run it with: cargo run --release -- run --script scripts/redirect.lua

function on_request(req)
  if req:is_method("ACK") then
    return req:drop()
  end
  if req:is_method("REGISTER") then
    return req:save("location")
  end
  if not req:is_myself(req.ruri) then
    return req:reply(403, "Forbidden")
  end
  if req:lookup("location") == 0 then
    return req:reply(404, "Not Found")
  end
  return req:redirect(302)
end
