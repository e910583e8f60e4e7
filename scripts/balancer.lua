-- moonroute balancer: a stateful proxy in front of a set of gateways, media servers or PBXs,
-- spreading calls over them with failover (Kamailio's dispatcher: ds_select_domain +
-- ds_next_domain in a failure_route). Every primitive is described in docs/scripting.md,
-- "Dispatcher".
--
-- The destinations are [[dispatcher.set]] tables in the configuration (or the sets file,
-- re-read by `moonroute ctl ds reload`), for example:
--
--   [[dispatcher.set]]
--   id = 1
--   destinations = [
--     { uri = "sip:10.0.0.11:5060" },
--     { uri = "sip:10.0.0.12:5060" },
--     { uri = "sip:10.0.0.13:5060;transport=tcp", weight = 2 },
--   ]
--
-- Each destination is probed ([dispatcher] probe_interval_secs): one that stops answering is
-- taken out until it answers again, and one that times out or answers 503 during a call is
-- taken out at once ([dispatcher] mark_on) while the call moves to the next destination.

-- The set the calls go to, and how a destination is chosen: "call_id" (every request of a
-- call to one destination, and the same choice on every node), "round_robin", "weighted",
-- "priority" (active/backup), "random", "call_load", "from_uri", "to_uri", "ruri", or
-- Kamailio's numbers (0, 4, 9, 8, 6, 10, 1, 2, 3).
local SET = 1
local ALGORITHM = "call_id"

-- Who may send calls to the destinations, by source address: your SBCs, PBXs or softswitch,
-- e.g. { ["192.0.2.20"] = true }. Empty as shipped, so this script relays for nobody until
-- you list them: a balancer in front of PSTN gateways that relays for strangers is a toll
-- fraud machine. The destinations themselves may always send requests inside the dialogs
-- set up through here.
local CALLERS = {}

-- Destinations tried per call at most (the first one and its failovers).
local MAX_ATTEMPTS = 3

-- How long a destination may stay silent (no 100 Trying, no answer at all) before the call
-- moves on to the next one, in milliseconds (Kamailio's fr_timer, set with t_set_fr). Without
-- it a call sent to a gateway whose plug was pulled waits for Timer B, 32 s: longer than most
-- callers wait. A gateway that answers, even only with 100 Trying, is waited for as usual.
local SILENT_AFTER_MS = 2000

function on_request(req)
  local ok, why, code = req:sanity()
  if not ok then
    if req:is_method("ACK") then
      return req:drop()
    end
    return req:reply(code, why)
  end

  -- Requests inside a dialog follow the route set recorded when it was set up.
  if req:has_to_tag() then
    if req:loose_route() then
      return req:t_relay()
    end
    if req:is_method("ACK") then
      return req:drop()
    end
    return req:reply(404, "Not Here")
  end

  if req:is_method("CANCEL") then
    return req:reply(481, "Call/Transaction Does Not Exist")
  end

  if not CALLERS[req.src_ip] then
    if sip.ds.is_from_list(req.src_ip) then
      -- A destination calling out: not ours to route in this script.
      return req:reply(403, "Forbidden")
    end
    return req:reply(403, "Relaying Forbidden")
  end

  -- Nobody steers our calls with a pre-loaded Route.
  req:remove_header("Route")

  if req:is_method("INVITE", "SUBSCRIBE", "REFER") then
    req:record_route()
  end

  local destination, reason = req:ds_select(SET, ALGORITHM)
  if not destination then
    sip.log("warn", "no destination for", req.call_id, ":", reason)
    return req:reply(503, "Service Unavailable")
  end
  req.vars.attempts = 1
  -- Also for the failover branches on_failure starts.
  req:t_set_fr(0, SILENT_AFTER_MS) -- 0: ringing time as configured
  return req:t_relay()
end

-- Every branch failed: try the next destination still up. A timeout (408: silent for
-- SILENT_AFTER_MS, or no final within Timer B) or a 503 takes the failed destination out
-- ([dispatcher] mark_on); a 4xx, 486 or 6xx is the callee's answer and goes back to the
-- caller.
function on_failure(req, res)
  local status = res.status
  local destination_failed = status == 408 or status >= 500
  if not destination_failed or req.vars.attempts >= MAX_ATTEMPTS then
    return
  end
  local next_destination = req:ds_next(status)
  if next_destination then
    req.vars.attempts = req.vars.attempts + 1
    sip.log("info", "call", req.call_id, "failed with", status, "; trying", next_destination)
    return req:t_relay()
  end
end
