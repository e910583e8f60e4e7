-- A PBX front (issue 24's first policy), as a Kamailio operator writes it:
--   * our users (sip:USER@127.0.0.1) register and call with digest authentication;
--   * a source that fails authentication 5 times in 60 s is banned for 10 minutes
--     (`moonroute ctl kv del ban:IP` lifts a ban, `ctl kv list ban:` shows them);
--   * a call to one of our users forks to all their phones, and goes to voicemail (with
--     X-Original-To) when nobody answers, they are busy (486), unavailable (480) or not
--     registered;
--   * a call to a PSTN number (7 to 15 digits, optional +) goes to gateway 1, and to
--     gateway 2 when gateway 1 fails (5xx) or does not answer (408).
-- Tests: moonroute test --lua examples/scripts/pbx_test.lua (from the repository root).
--
-- "Voicemail after 20 s of ringing" is this call's own timer (`req:t_set_fr`, Kamailio's
-- fr_inv_timer): calls to PSTN gateways keep the configured Timer C. When it fires the ringing
-- branches are CANCELled and on_failure sees a 408 (or 487 if a branch answers the CANCEL).

local GATEWAYS = { "127.0.0.1:5091", "127.0.0.1:5092" } -- stand-ins: your PSTN gateways
local VOICEMAIL = "sip:vm@127.0.0.1:5090"
local NO_ANSWER_MS = 20000 -- ringing time before voicemail (req:t_set_fr)
local MAX_AUTH_FAILURES = 5
local AUTH_WINDOW = 60
local BAN_SECONDS = 600
local PSTN_NUMBER = [[^\+?[0-9]{7,15}$]]

-- Refused credentials by reason: a few fixed values (authorize's reasons), looked up on the
-- failure path only.
local function count_auth_failure(reason)
  sip.metrics.counter{
    name = "pbx_auth_failures_total",
    help = "Requests whose credentials were refused, by reason.",
    labels = { reason = reason },
  }:inc()
end

function on_request(req)
  local src_ip = req.src_ip
  if sip.kv.get("ban:" .. src_ip) then
    return req:drop("banned")
  end
  local ok, why, code = req:sanity()
  if not ok then
    if req:is_method("ACK") then
      return req:drop()
    end
    return req:reply(code, why)
  end
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
  if req:is_method("ACK") then
    return req:drop()
  end
  if not authenticated(req) then
    return
  end
  if req:is_method("REGISTER") then
    return req:save("location")
  end
  if not req:is_method("INVITE") then
    return req:reply(405, "Method Not Allowed")
  end
  req:record_route()
  if sip.re.match(PSTN_NUMBER, req.ruri_user) then
    req.vars.gateway = 1
    return req:t_relay("sip:" .. req.ruri_user .. "@" .. GATEWAYS[1])
  end
  return call_user(req)
end

-- Our users and REGISTERs must authenticate; refusals count towards a ban of the source.
function authenticated(req)
  if not req:is_method("REGISTER") and not req:is_myself(req.from_uri) then
    req:reply(403, "Relaying Forbidden")
    return false
  end
  local user, why = req:authorize()
  if not user then
    if why ~= "no credentials" and why ~= "stale nonce" then
      count_auth_failure(why)
      local src_ip = req.src_ip
      local failures = sip.kv.incr("authfail:" .. src_ip, 1, AUTH_WINDOW)
      if failures >= MAX_AUTH_FAILURES then
        sip.kv.set("ban:" .. src_ip, 1, BAN_SECONDS)
        sip.log("warn", "banning", src_ip, "for", BAN_SECONDS, "s after", failures,
          "refused credentials")
        req:drop("banned")
        return false
      end
    end
    req:auth_challenge()
    return false
  end
  if not req:check_from() then
    req:reply(403, "Forbidden auth ID")
    return false
  end
  req:consume_credentials()
  return true
end

function call_user(req)
  req.vars.user = req.ruri_user
  if req:lookup("location") == 0 then
    req.vars.voicemail = true
    return req:t_relay(VOICEMAIL)
  end
  req:t_set_fr(NO_ANSWER_MS)
  return req:t_relay()
end

function on_branch(req, branch)
  if branch.ruri == VOICEMAIL then
    branch:append_header("X-Original-To", req.vars.user)
  end
end

function on_failure(req, res)
  local status = res.status
  local gateway = req.vars.gateway
  if gateway then
    -- 5xx or no answer from a gateway: the next one; a 4xx/6xx is the callee's answer.
    if (status >= 500 and status < 600 or status == 408) and GATEWAYS[gateway + 1] then
      req.vars.gateway = gateway + 1
      return req:t_relay("sip:" .. req.ruri_user .. "@" .. GATEWAYS[gateway + 1])
    end
    return
  end
  -- Busy, unavailable, nobody answered (408), or Timer C cancelled the ringing (487).
  if req.vars.user and not req.vars.voicemail
      and (status == 486 or status == 480 or status == 408 or status == 487) then
    req.vars.voicemail = true
    return req:t_relay(VOICEMAIL)
  end
end
