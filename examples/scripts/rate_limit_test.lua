-- Offline tests of examples/scripts/rate_limit.lua:
--   moonroute test --lua examples/scripts/rate_limit_test.lua     (from the repository root)

local SCRIPT = "examples/scripts/rate_limit.lua"
local SUBSCRIBERS = [[
alice@127.0.0.1  alice-secret
bob@127.0.0.1    bob-secret
]]
local LOCATION = "sip:carol@127.0.0.1:5060  sip:carol@127.0.0.1:5080  q=1.0\n"

local function invite(from, extra)
  local lines = {
    "INVITE sip:carol@127.0.0.1:5060 SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-rate",
    "Max-Forwards: 70",
    "From: <sip:" .. from .. "@127.0.0.1:5060>;tag=r1",
    "To: <sip:carol@127.0.0.1:5060>",
    "Call-ID: rate-test@127.0.0.1",
    "CSeq: 1 INVITE",
  }
  for _, line in ipairs(extra or {}) do
    lines[#lines + 1] = line
  end
  lines[#lines + 1] = "Content-Length: 0"
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

local s = moonroute.session{ script = SCRIPT, subscribers = SUBSCRIBERS, location = LOCATION }

local function call(user)
  local r = s:run{ message = invite(user) }
  assert(r.code == 407, tostring(r.code))
  local credentials = moonroute.digest{
    challenge = r.reply_headers[1], user = user, password = user .. "-secret",
    method = "INVITE", uri = "sip:carol@127.0.0.1:5060",
  }
  return s:run{ message = invite(user, { "Proxy-Authorization: " .. credentials }) }
end

for i = 1, 5 do
  local r = call("alice")
  assert(r.decision == "relay", i .. ": " .. r.decision .. " " .. tostring(r.code))
end
local r = call("alice")
assert(r.code == 503 and r.reason == "Rate Limit Exceeded", tostring(r.code))
local retry = r.reply_headers[1]:match("^Retry%-After: (%d+)$")
assert(retry and tonumber(retry) <= 60, r.reply_headers[1])
assert(s:metrics()["ratelimit_invites_refused_total"] == 1)
assert(s:kv("rate:alice@127.0.0.1") == 6)
-- Bob has his own budget.
assert(call("bob").decision == "relay")

-- A user already at the limit (kv pre-filled) is refused on the first call of a run.
r = moonroute.run{ script = SCRIPT, subscribers = SUBSCRIBERS, location = LOCATION,
                   kv = { ["rate:alice@127.0.0.1"] = 5 }, message = invite("alice") }
assert(r.code == 407) -- the challenge comes first: no counting before authentication

-- A typo in a test is an error, not a silently missing fixture.
local ok, err = pcall(moonroute.run, { script = SCRIPT, subscriber = SUBSCRIBERS,
                                      message = invite("alice") })
assert(not ok and tostring(err):find('unknown key "subscriber" %(did you mean subscribers%?%)'), tostring(err))
