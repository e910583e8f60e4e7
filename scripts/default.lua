-- moonroute default routing script: a registrar and stateful proxy for this server's domains
-- (config `domains`, or its listen addresses when none are configured). It is Kamailio's
-- classic default configuration, translated: every primitive is described in
-- docs/scripting.md. Edit it while the server runs: the change is live within a second, and a
-- broken version is refused while this one keeps serving.
--
-- Already done by the engine before on_request runs: parsing and sanity checks (400),
-- Max-Forwards (483), Require/Proxy-Require (420), loop detection (482), removing our own
-- Route entries (RFC 3261 §16.4), OPTIONS to the server itself, retransmissions, and CANCEL
-- of a request being relayed. What this policy refuses, and how to open it for peers of your
-- own, is in docs/scripting.md, "Securing a deployment".

-- Digest authentication (RFC 3261 §22) of our own users, Kamailio's `#!define WITH_AUTH`:
-- a REGISTER is challenged with 401 and a request whose From is in our domains with 407;
-- users are provisioned with `moonroute ctl user add USER@DOMAIN`. Set it to false for a lab
-- where anyone may register any AOR of our domains and "our users" means a From in our
-- domains.
local AUTHENTICATE = true

-- Flood protection: source addresses that are not rate-limited, and how long a source over
-- the rate limit ([pike] in the configuration) stays banned. Empty as shipped. List only
-- machines of your own whose every request you trust, such as a PSTN gateway or a media
-- server: { ["192.0.2.30"] = true }, as Kamailio's allow_trusted() would. Never list an
-- address that forwards other people's requests: behind a TLS terminator, WebSocket gateway
-- or SBC on this host every client comes from 127.0.0.1, and listing it turns flood
-- protection off for all of them.
local TRUSTED = {}
local BAN_SECONDS = 300

-- Peers allowed to choose the next hop with a pre-loaded Route on the requests they send
-- here (RFC 3261 §16.6 step 7): an SBC or edge proxy of your own, by source address, e.g.
-- { ["192.0.2.20"] = true }. Empty as shipped: anyone else's pre-loaded Route is removed, as
-- Kamailio's default configuration does (remove_hf("Route")); following it would relay the
-- request wherever the sender points (an open relay, and a port scanner of every host this
-- server reaches). Our own Route entries are consumed by the engine before on_request runs,
-- and a registered contact's Path is added after this, when the request is relayed.
local ROUTE_PEERS = {}

-- User agents of well-known SIP scanners (SIPVicious and its kin), lower case, found anywhere
-- in the User-Agent header: their requests are dropped without an answer, as Kamailio's
-- default configuration does (friendly|scanner|sipcli|sipvicious|VaxSIPUserAgent|pplsip).
-- Each drop is one moonroute::refused log line and counts in scanner_requests_dropped_total.
local SCANNERS = {
  "friendly-scanner", "friendly-request", "scanner", "sipvicious", "sipcli",
  "vaxsipuseragent", "vaxipuseragent", "pplsip", "sundayddr", "sip-scan",
}
-- Phones that give up on a digest challenge offering SHA-256 (RFC 8760), even beside MD5,
-- by Lua patterns on the User-Agent header: baresip before 3.12 (its libre computes MD5
-- only), such as Debian 12's baresip 1.0. They are challenged with MD5 alone, as OpenSIPS's
-- www_challenge(realm, qop, "MD5") or Kamailio's auth_algorithm("MD5") would; every other
-- phone with [auth] algorithms, SHA-256 first. This changes what is offered, never what is
-- accepted ([auth] algorithms): a client claiming to be one of these gets nothing it could
-- not have by answering MD5 to the full challenge. Without MD5 in [auth] algorithms they are
-- offered SHA-256 and cannot register.
local MD5_ONLY_AGENTS = {
  "^baresip v[0-2]%.", "^baresip v3%.%d%.", "^baresip v3%.1[01]%.",
}
local scanner_drops = sip.metrics.counter{
  name = "scanner_requests_dropped_total",
  help = "Requests from well-known SIP scanners (User-Agent) that scripts/default.lua dropped.",
}

function on_request(req)
  -- Read once: every field read and method call on req crosses into the engine.
  local src_ip = req.src_ip

  -- Flood protection (Kamailio's pike + htable "ipban"): a banned source is ignored; a source
  -- over the rate limit is banned for BAN_SECONDS, with one log line.
  if not TRUSTED[src_ip] then
    local ban = "ipban:" .. src_ip
    if sip.kv.get(ban) then
      return req:drop()
    end
    if req:pike_check() then
      sip.kv.set(ban, 1, BAN_SECONDS)
      sip.log("warn", "pike: banning " .. src_ip .. " for " .. BAN_SECONDS .. " s")
      return req:drop()
    end
  end

  -- Scanners get no answer: an answer tells them a SIP server is here.
  local scanner = scanner_of(req:header("User-Agent"))
  if scanner then
    scanner_drops:inc()
    return req:drop("scanner user agent " .. scanner)
  end

  -- Kamailio's sanity_check() defaults, on top of the engine's own checks: a sip/sips/tel
  -- Request-URI, Content-Length matching the body, Expires a number, CSeq under 2^31... An
  -- RFC 2543 phone's INVITE (no Contact, no branch cookie) passes, as RFC 4475 §3.4.1 asks;
  -- req:sanity{invite_contact = true, via_branch = true} refuses it.
  local ok, why, code = req:sanity()
  if not ok then
    if req:is_method("ACK") then
      return req:drop()
    end
    return req:reply(code, why)
  end

  -- NAT traversal (Kamailio's route[NATDETECT]): the engine already records received/rport
  -- ([nat] force_rport); a phone whose Via or Contact is not where its packets come from is
  -- behind a NAT.
  local nated = req:nat_detect()

  -- Requests inside a dialog follow the route set the dialog recorded.
  if req:has_to_tag() then
    if nated then
      -- A target refresh (re-INVITE, UPDATE) from a NATed phone: as for its INVITE below.
      req:fix_nated_contact()
    end
    return in_dialog(req)
  end

  -- A CANCEL that matched no transaction here (RFC 3261 §9.2).
  if req:is_method("CANCEL") then
    return req:reply(481, "Call/Transaction Does Not Exist")
  end

  if AUTHENTICATE and not authenticate(req) then
    return
  end

  -- A new request is routed by its Request-URI (and the contacts registered for it), never
  -- by a Route its sender pre-loaded, unless the sender is one of ROUTE_PEERS.
  if ROUTE_PEERS[src_ip] then
    req:follow_preloaded_route()
  elseif req:header("Route") then
    -- (req:headers builds a table: only for a request that has a Route to log.)
    local route = req:headers("Route")
    req:remove_header("Route")
    sip.log("info", "pre-loaded Route removed, not followed:", table.concat(route, ", "),
      "from", src_ip)
  end

  -- Requests for other domains: only our own users may send them out (no open relay). With
  -- AUTHENTICATE, a From in our domains has been authenticated above.
  if not req:is_myself(req.ruri) then
    if not req:is_myself(req.from_uri) then
      return req:reply(403, "Relaying Forbidden")
    end
    req:record_route()
    if nated then
      -- As for calls to our users below: the far end's requests in this dialog come back
      -- through us to the caller's Contact, which must be where the caller really is.
      req:fix_nated_contact()
    end
    track_call(req)
    return req:t_relay()
  end

  if req:is_method("REGISTER") then
    if nated then
      -- Keep the Contact; the binding is reached through the address the REGISTER came from.
      req:fix_nated_contact()
    end
    return req:save("location")
  end

  -- Stay in the path of the dialogs we set up, so in-dialog requests come back through us.
  if req:is_method("INVITE", "SUBSCRIBE", "REFER") then
    req:record_route()
    if nated then
      -- The callee's requests in this dialog must go where the caller really is.
      req:fix_nated_contact()
    end
    track_call(req)
  end

  -- Fork to every registered contact of the user (highest q first, RFC 3261 §16.6).
  local contacts = req:lookup("location")
  if contacts < 0 then
    -- The location store could not answer (a shared Redis unreachable): not a 404.
    return req:reply(503, "Service Unavailable", { ["Retry-After"] = "5" })
  end
  if contacts == 0 then
    return req:reply(404, "Not Found")
  end
  return req:t_relay()
end

-- Tracks a call this server record-routes (Kamailio's dlg_manage): `moonroute ctl dlg`, the
-- CDR in <data_dir>/cdr.jsonl, and req:dlg_known() for its in-dialog requests. True when the
-- call is tracked; a full dialog table is logged and the call goes on untracked. To limit a
-- user to two calls at once (across event loops), replace each `track_call(req)` line above
-- with these two (docs/routing-scripts.md, "Calls"):
--   if track_call(req) and not sip.dlg.profile_add("caller", req.from_uri, 2) then
--     return req:reply(486, "Busy Here") end
function track_call(req)
  if req:is_method("INVITE") then
    return req:dlg_manage()
  end
  return false
end

-- scanner_of's answers (a SCANNERS entry, or false) by User-Agent value, so a phone's every
-- request does not search its User-Agent for each entry again. Bounded: values longer than
-- SCANNER_MEMO_LONGEST are not kept, and the memo starts afresh once it holds
-- SCANNER_MEMO_ENTRIES (a sender varying its User-Agent only gets the search run, as it
-- would without the memo).
local SCANNER_MEMO_ENTRIES = 1024
local SCANNER_MEMO_LONGEST = 256
local scanner_memo, scanner_memo_entries = {}, 0

-- The SCANNERS entry found in a User-Agent value, or nil.
function scanner_of(user_agent)
  if not user_agent then
    return nil
  end
  local known = scanner_memo[user_agent]
  if known ~= nil then
    return known or nil
  end
  local found = false
  local ua = user_agent:lower()
  for _, name in ipairs(SCANNERS) do
    if ua:find(name, 1, true) then
      found = name
      break
    end
  end
  if #user_agent <= SCANNER_MEMO_LONGEST then
    if scanner_memo_entries >= SCANNER_MEMO_ENTRIES then
      scanner_memo, scanner_memo_entries = {}, 0
    end
    scanner_memo[user_agent] = found
    scanner_memo_entries = scanner_memo_entries + 1
  end
  return found or nil
end

-- True for a User-Agent in MD5_ONLY_AGENTS.
function md5_only(user_agent)
  for _, pattern in ipairs(MD5_ONLY_AGENTS) do
    if user_agent and user_agent:find(pattern) then
      return true
    end
  end
  return false
end

-- Authenticates a REGISTER (401), and a request from one of our domains (407). Returns true
-- when the request may be routed; otherwise it has been answered. Requests from outside to
-- our users are not challenged (they cannot have credentials here); on_request refuses to
-- relay them elsewhere.
function authenticate(req)
  if req:is_method("ACK") then
    -- An ACK cannot be challenged (§22.1); one outside a dialog and a transaction is stray.
    req:drop()
    return false
  end
  if not req:is_method("REGISTER") and not req:is_myself(req.from_uri) then
    return true
  end
  -- The realm is the To host for REGISTER, the From host otherwise.
  if not req:authorize() then
    req:auth_challenge(nil, md5_only(req:header("User-Agent")) and { "MD5" } or nil)
    return false
  end
  -- The credentials must be those of the AOR registered (To) or of the caller (From).
  if not req:check_from() then
    req:reply(403, "Forbidden auth ID")
    return false
  end
  -- Our credentials are not for the next hop.
  req:consume_credentials()
  return true
end

-- In-dialog requests are not authenticated (an ACK cannot be challenged): loose_route() is
-- true only for a Route this server signed for the dialog when it Record-Routed it, so a
-- stranger's To tag and `Route: <sip:us;lr>` get the 404 below, not a relay.
--
-- A call this server tracks (track_call) is also checked against its dialog: its requests must
-- come from one of its two parties and go to the other, and stop when it ends (481), so a
-- captured Route reaches nobody outside the call, and nobody after it (its signed Route says
-- it was tracked: "ended" even once the table forgot it). A dialog it does not track (a
-- subscription, a call set up before this process started) is routed on its signed Route
-- alone.
function in_dialog(req)
  if req:loose_route() then
    local known, why = req:dlg_known()
    if known or why == "untracked" then
      return req:t_relay()
    end
    if req:is_method("ACK") then
      return req:drop("ACK outside its dialog (" .. why .. ")")
    end
    return req:reply(481, "Call/Transaction Does Not Exist")
  end
  if req:is_method("ACK") then
    -- An ACK for a 2xx without a route set through us is not ours to route.
    return req:drop()
  end
  -- No Route of ours: nothing says where this dialog is (Kamailio's default WITHINDLG route
  -- answers the same, sl_send_reply("404", "Not here")).
  return req:reply(404, "Not Here")
end

-- Responses (Kamailio's onreply_route): a callee behind a NAT answers with a Contact it cannot
-- be reached at; the caller's ACK, BYE and re-INVITEs come through us (record_route) to that
-- Contact, so it becomes the address the answer came from.
function on_reply(req, res)
  if res:nat_detect() then
    res:fix_nated_contact()
  end
end
