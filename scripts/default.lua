-- moonroute default routing script: a registrar and stateful proxy for this server's domains
-- (config `domains`, or its listen addresses when none are configured). It is Kamailio's
-- classic default configuration, translated: every primitive is described in
-- docs/scripting.md. Edit it while the server runs: the change is live within a second, and a
-- broken version is refused while this one keeps serving.
--
-- Already done by the engine before on_request runs: parsing and sanity checks (400),
-- Max-Forwards (483), Require/Proxy-Require (420), loop detection (482), removing our own
-- Route entries (RFC 3261 §16.4), OPTIONS to the server itself, retransmissions, and CANCEL
-- of a request being relayed.

-- Flood protection: sources not rate-limited (this host: local gateways and media servers,
-- and the benchmarks in bench/), and how long a source over the rate limit ([pike] in the
-- configuration) stays banned. Add your own gateways, as Kamailio's allow_trusted() would.
local TRUSTED = { ["127.0.0.1"] = true, ["::1"] = true }
local BAN_SECONDS = 300

function on_request(req)
  -- Flood protection (Kamailio's pike + htable "ipban"): a banned source is ignored; a source
  -- over the rate limit is banned for BAN_SECONDS, with one log line.
  if not TRUSTED[req.src_ip] then
    local ban = "ipban:" .. req.src_ip
    if sip.kv.get(ban) then
      return req:drop()
    end
    if req:pike_check() then
      sip.kv.set(ban, 1, BAN_SECONDS)
      sip.log("warn", "pike: banning " .. req.src_ip .. " for " .. BAN_SECONDS .. " s")
      return req:drop()
    end
  end

  -- Stricter than the engine's own checks (Kamailio's sanity_check): one SIP Contact in an
  -- INVITE, a sip/sips/tel Request-URI, Content-Length matching the body, Expires a number...
  local ok, why, code = req:sanity()
  if not ok then
    if req:is_method("ACK") then
      return req:drop()
    end
    return req:reply(code, why)
  end

  -- Requests inside a dialog follow the route set the dialog recorded.
  if req:has_to_tag() then
    return in_dialog(req)
  end

  -- A CANCEL that matched no transaction here (RFC 3261 §9.2).
  if req:is_method("CANCEL") then
    return req:reply(481, "Call/Transaction Does Not Exist")
  end

  -- Requests for other domains: only our own users may send them out (no open relay).
  -- Until digest authentication lands, "our own" means a From URI in our domains.
  if not req:is_myself(req.ruri) then
    if not req:is_myself(req.from_uri) then
      return req:reply(403, "Relaying Forbidden")
    end
    req:record_route()
    return req:t_relay()
  end

  if req:is_method("REGISTER") then
    return req:save("location")
  end

  -- Stay in the path of the dialogs we set up, so in-dialog requests come back through us.
  if req:is_method("INVITE", "SUBSCRIBE", "REFER") then
    req:record_route()
  end

  -- Fork to every registered contact of the user (highest q first, RFC 3261 §16.6).
  if req:lookup("location") == 0 then
    return req:reply(404, "Not Found")
  end
  return req:t_relay()
end

function in_dialog(req)
  if req:loose_route() then
    return req:t_relay()
  end
  if req:is_method("ACK") then
    -- An ACK for a 2xx without a route set through us is not ours to route.
    return req:drop()
  end
  return req:reply(404, "Not Here")
end
