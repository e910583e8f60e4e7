-- Offline tests of examples/scripts/pbx.lua, its failure paths included:
--   moonroute test --lua examples/scripts/pbx_test.lua     (from the repository root)
-- `responses = {...}` gives each branch's outcome in the order the branches start: a code,
-- "timeout", or a list such as {180, 486}; on_branch, on_reply and on_failure then run as on
-- the server. A session (moonroute.session) keeps kv, location and nonces between its runs.

local PBX = "examples/scripts/pbx.lua"
local SUBSCRIBERS = [[
alice@127.0.0.1  alice-secret
bob@127.0.0.1    bob-secret
]]
local LOCATION = [[
sip:bob@127.0.0.1:5060  sip:bob@127.0.0.1:5080  q=1.0
sip:bob@127.0.0.1:5060  sip:bob@127.0.0.1:5081  q=1.0
]]

local function request(method, ruri, extra)
  local lines = {
    method .. " " .. ruri .. " SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-pbx-" .. method,
    "Max-Forwards: 70",
    "From: <sip:alice@127.0.0.1:5060>;tag=a1",
    "To: <" .. ruri .. ">",
    "Call-ID: pbx-test@127.0.0.1",
    "CSeq: 1 " .. method,
    "Contact: <sip:alice@127.0.0.1:5070>",
  }
  for _, line in ipairs(extra or {}) do
    lines[#lines + 1] = line
  end
  lines[#lines + 1] = "Content-Length: 0"
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

-- Challenge, then answer it: the headers of an authenticated INVITE to `ruri`.
local function authenticated_invite(session, ruri, password)
  local r = session:run{ message = request("INVITE", ruri) }
  assert(r.code == 407, tostring(r.code))
  local credentials = moonroute.digest{
    challenge = r.reply_headers[1],
    user = "alice",
    password = password or "alice-secret",
    method = "INVITE",
    uri = ruri,
  }
  return request("INVITE", ruri, { "Proxy-Authorization: " .. credentials })
end

local function pbx()
  return moonroute.session{ script = PBX, subscribers = SUBSCRIBERS, location = LOCATION }
end

-- A call to bob forks to both phones; one is busy, the other does not answer: voicemail,
-- with X-Original-To added on the voicemail branch, which answers.
local s = pbx()
local invite = authenticated_invite(s, "sip:bob@127.0.0.1:5060")
local r = s:run{ message = invite, responses = { { 180, 486 }, "timeout", 200 } }
assert(r.error == nil, r.error)
assert(r.decision == "relay" and #r.targets == 2, r.decision)
assert(#r.failures == 1 and r.failures[1].code == 486, tostring(r.failures[1] and r.failures[1].code))
assert(r.failures[1].targets[1] == "sip:vm@127.0.0.1:5090", r.failures[1].targets[1])
assert(r.branches[3].target == "sip:vm@127.0.0.1:5090")
assert(r.final == 200, tostring(r.final))

-- Timer C cancelled the ringing (487 on every branch): voicemail as well.
r = s:run{ message = invite, responses = { { 180, 487 }, { 180, 487 }, 200 } }
assert(r.final == 200 and #r.failures == 1, tostring(r.final))

-- Answered: no failure route.
r = s:run{ message = invite, responses = { 200, 487 } }
assert(#r.failures == 0 and r.final == 200)

-- Voicemail itself busy: on_failure does not loop, the caller gets the 486.
r = s:run{ message = invite, responses = { 486, 486, 486 } }
assert(#r.failures == 2 and r.final == 486, tostring(r.final))
assert(#r.failures[2].targets == 0)

-- A user with no phone registered goes to voicemail at once.
local carol = authenticated_invite(s, "sip:carol@127.0.0.1:5060")
r = s:run{ message = carol }
assert(r.targets[1] == "sip:vm@127.0.0.1:5090", r.targets[1])

-- A PSTN number: gateway 1; a 503 there, gateway 2; a timeout there too, the caller gets 408.
local pstn = authenticated_invite(s, "sip:+33123456789@127.0.0.1:5060")
r = s:run{ message = pstn, responses = { 503, 200 } }
assert(r.targets[1] == "sip:+33123456789@127.0.0.1:5091", r.targets[1])
assert(r.failures[1].targets[1] == "sip:+33123456789@127.0.0.1:5092", r.failures[1].targets[1])
assert(r.final == 200)
r = s:run{ message = pstn, responses = { "timeout", "timeout" } }
assert(#r.failures == 2 and r.final == 408, tostring(r.final))
-- A 486 from the gateway is the callee's answer: no failover.
r = s:run{ message = pstn, responses = { 486 } }
assert(#r.failures == 1 and #r.failures[1].targets == 0 and r.final == 486)
-- Too short to be a number: a user lookup (none: voicemail).
r = s:run{ message = authenticated_invite(s, "sip:123456@127.0.0.1:5060") }
assert(r.targets[1] == "sip:vm@127.0.0.1:5090", r.targets[1])

-- Five refused passwords from one source within 60 s: banned, and the sixth request from it
-- is dropped whatever it carries; another source is not affected.
s = pbx()
for attempt = 1, 5 do
  r = s:run{ message = authenticated_invite(s, "sip:bob@127.0.0.1:5060", "guess" .. attempt),
            source = "udp:127.0.0.9:5070" }
  if attempt < 5 then
    assert(r.code == 407, attempt .. ": " .. tostring(r.code))
  else
    assert(r.decision == "drop" and r.reason == "banned", r.decision)
  end
end
assert(s:kv("ban:127.0.0.9") == 1)
assert(s:kv("authfail:127.0.0.9") == 5)
r = s:run{ message = request("OPTIONS", "sip:127.0.0.1:5060"), source = "udp:127.0.0.9:5070" }
assert(r.decision == "drop", r.decision)
r = s:run{ message = request("INVITE", "sip:bob@127.0.0.1:5060"), source = "udp:127.0.0.8:5070" }
assert(r.code == 407, tostring(r.code))
local metrics = s:metrics()
assert(metrics['pbx_auth_failures_total{reason="wrong password"}'] == 5,
  tostring(metrics['pbx_auth_failures_total{reason="wrong password"}']))

-- A ban set beforehand (as `moonroute ctl kv set ban:127.0.0.7 1 600` would) holds.
r = moonroute.run{ script = PBX, kv = { ["ban:127.0.0.7"] = 1 },
                   message = request("OPTIONS", "sip:127.0.0.1:5060"), source = "udp:127.0.0.7:5070" }
assert(r.decision == "drop", r.decision)

-- Strangers do not relay through us.
r = moonroute.run{ script = PBX, message = request("INVITE", "sip:someone@127.0.0.9"):gsub(
  "From: <sip:alice@127.0.0.1:5060>", "From: <sip:mallory@127.0.0.9>") }
assert(r.code == 403, tostring(r.code))
