-- A per-user INVITE rate limiter (issue 24's third policy): each authenticated user may start
-- at most LIMIT calls per WINDOW seconds; more get 503 with Retry-After (RFC 3261 §21.5.4)
-- and are counted in a Prometheus counter. Stateful relaying (t_relay) makes a retransmitted
-- INVITE the transaction's, not a new call: with a stateless `forward`, retransmissions run
-- on_request again and would count twice. `moonroute ctl kv del rate:USER` resets a user.
-- Tests: moonroute test --lua examples/scripts/rate_limit_test.lua

local LIMIT = 5
local WINDOW = 60

local refused = sip.metrics.counter{
  name = "ratelimit_invites_refused_total",
  help = "Initial INVITEs refused by the per-user rate limit.",
}

function on_request(req)
  if req:has_to_tag() then
    if req:loose_route() then
      return req:t_relay()
    end
    if req:is_method("ACK") then
      return req:drop()
    end
    return req:reply(404, "Not Here")
  end
  if req:is_method("ACK") then
    return req:drop()
  end
  if req:is_method("CANCEL") then
    return req:reply(481, "Call/Transaction Does Not Exist")
  end
  if not req:is_myself(req.from_uri) then
    return req:reply(403, "Relaying Forbidden")
  end
  local user = req:authorize()
  if not user then
    return req:auth_challenge()
  end
  if not req:check_from() then
    return req:reply(403, "Forbidden auth ID")
  end
  req:consume_credentials()
  if req:is_method("REGISTER") then
    return req:save("location")
  end
  if req:is_method("INVITE") then
    local key = "rate:" .. user
    if sip.kv.incr(key, 1, WINDOW) > LIMIT then
      refused:inc()
      local wait = math.ceil(sip.kv.ttl(key) or WINDOW)
      return req:reply(503, "Rate Limit Exceeded", { ["Retry-After"] = tostring(wait) })
    end
    req:record_route()
  end
  if req:lookup("location") == 0 then
    return req:reply(404, "Not Found")
  end
  return req:t_relay()
end
