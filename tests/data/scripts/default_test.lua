-- Unit tests of scripts/default.lua (and tests/data/scripts/vars.lua) without a network:
--   moonroute test --lua tests/data/scripts/default_test.lua
-- run from the repository root. Each moonroute.run{} runs on_request once on a message, with
-- the server pretending to listen on udp:127.0.0.1:5060 and the message coming from
-- 127.0.0.1:5070; a failed assert stops the file with its file:line.
--
-- default.lua authenticates (AUTHENTICATE = true). Without `subscribers` a run has no
-- subscriber table, so requests from our users and REGISTERs are only challenged; routing is
-- tested with callers from outside, which are not challenged. The authenticated paths run with
-- the SUBSCRIBERS fixture: a challenge's nonce is valid in the next run (offline nonces are
-- signed with a fixed secret), and moonroute.digest{} computes the credentials a phone would.

local LOCATION = [[
# AOR                   CONTACT                   options
sip:bob@127.0.0.1:5060  sip:bob@127.0.0.1:5080    q=1.0
sip:bob@127.0.0.1:5060  sip:bob@127.0.0.1:5081    q=0.5
]]

local DEFAULT = "scripts/default.lua"

-- A request as text; `to_tag` makes it an in-dialog request.
local function message(method, ruri, from, to_tag, extra)
  local lines = {
    method .. " " .. ruri .. " SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-lua-" .. method,
    "Max-Forwards: 70",
    "From: <" .. from .. ">;tag=a1",
    "To: <" .. ruri .. ">" .. (to_tag and (";tag=" .. to_tag) or ""),
    "Call-ID: lua-test-" .. method .. "@127.0.0.1",
    "CSeq: 1 " .. method,
    "Contact: <sip:alice@127.0.0.1:5070>",
  }
  for _, line in ipairs(extra or {}) do
    lines[#lines + 1] = line
  end
  lines[#lines + 1] = "Content-Length: 0"
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

local function contains(list, wanted)
  for _, item in ipairs(list) do
    if item == wanted then
      return true
    end
  end
  return false
end

-- An INVITE for a registered user forks to every contact, highest q first, Record-Routed.
local r = moonroute.run{
  script = DEFAULT,
  location = LOCATION,
  message = [[
INVITE sip:bob@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-lua-1
Max-Forwards: 70
From: "Alice" <sip:alice@example.net>;tag=a1
To: <sip:bob@127.0.0.1:5060>
Call-ID: lua-test-1@127.0.0.1
CSeq: 1 INVITE
Contact: <sip:alice@127.0.0.1:5070>
Content-Length: 0
]],
}
assert(r.error == nil, r.error)
assert(r.decision == "relay", "INVITE to bob: " .. r.decision)
assert(r.primitive == "t_relay")
assert(r.record_route == true, "an INVITE is Record-Routed")
assert(#r.targets == 2, "both of bob's contacts")
assert(r.targets[1] == "sip:bob@127.0.0.1:5080", r.targets[1])
assert(r.targets[2] == "sip:bob@127.0.0.1:5081", r.targets[2])
assert(r.code == nil)
assert(next(r.vars) == nil, "default.lua keeps no per-transaction variables")

-- A MESSAGE is relayed too, but not Record-Routed.
r = moonroute.run{
  script = DEFAULT,
  location = LOCATION,
  message = message("MESSAGE", "sip:bob@127.0.0.1:5060", "sip:alice@example.net"),
}
assert(r.decision == "relay" and #r.targets == 2)
assert(r.record_route == false, "only dialog-creating requests are Record-Routed")

-- A user without bindings: 404.
r = moonroute.run{
  script = DEFAULT,
  location = LOCATION,
  message = message("INVITE", "sip:carol@127.0.0.1:5060", "sip:alice@example.net"),
}
assert(r.decision == "reply", r.decision)
assert(r.code == 404, tostring(r.code))
assert(r.reason == "Not Found")
assert(r.primitive == "reply")

-- A foreign domain from a foreign user: no open relay.
r = moonroute.run{
  script = DEFAULT,
  message = message("INVITE", "sip:bob@example.org", "sip:mallory@example.net"),
}
assert(r.decision == "reply" and r.code == 403, tostring(r.code))
assert(r.reason == "Relaying Forbidden", r.reason)

-- A foreign domain from one of our users: challenged first (407, SHA-256 then MD5).
r = moonroute.run{
  script = DEFAULT,
  message = message("INVITE", "sip:bob@example.org", "sip:alice@127.0.0.1:5060"),
}
assert(r.decision == "reply" and r.code == 407, tostring(r.code))
assert(r.primitive == "auth_challenge", tostring(r.primitive))
assert(r.reply_headers[1]:find('^Proxy%-Authenticate: Digest realm="127.0.0.1", nonce="'), r.reply_headers[1])
assert(r.reply_headers[1]:find("algorithm=SHA%-256$"), r.reply_headers[1])
assert(r.reply_headers[2]:find("algorithm=MD5$"), r.reply_headers[2])

-- A REGISTER is challenged (401, WWW-Authenticate) before anything is saved.
r = moonroute.run{
  script = DEFAULT,
  message = message("REGISTER", "sip:127.0.0.1:5060", "sip:carol@127.0.0.1:5060", nil, {
    "Expires: 600",
  }),
}
assert(r.decision == "reply" and r.code == 401, tostring(r.code))
assert(r.reason == "Unauthorized", r.reason)
assert(r.reply_headers[1]:find('^WWW%-Authenticate: Digest realm="127.0.0.1"'), r.reply_headers[1])

-- Credentials cannot be checked offline: still a challenge.
r = moonroute.run{
  script = DEFAULT,
  message = message("REGISTER", "sip:127.0.0.1:5060", "sip:carol@127.0.0.1:5060", nil, {
    'Authorization: Digest username="carol", realm="127.0.0.1", nonce="00", uri="sip:127.0.0.1:5060", response="00"',
  }),
}
assert(r.code == 401, tostring(r.code))

-- A CANCEL that matched nothing: 481.
r = moonroute.run{
  script = DEFAULT,
  message = message("CANCEL", "sip:bob@127.0.0.1:5060", "sip:alice@127.0.0.1:5060"),
}
assert(r.code == 481, tostring(r.code))

-- In-dialog requests without a Route through us: 404, and an ACK is dropped.
r = moonroute.run{
  script = DEFAULT,
  message = message("BYE", "sip:bob@127.0.0.1:5080", "sip:alice@127.0.0.1:5060", "b1"),
}
assert(r.decision == "reply" and r.code == 404 and r.reason == "Not Here", tostring(r.code))
r = moonroute.run{
  script = DEFAULT,
  message = message("ACK", "sip:bob@127.0.0.1:5080", "sip:alice@127.0.0.1:5060", "b1"),
}
assert(r.decision == "drop", r.decision)

-- In-dialog requests with our signed Route (what our Record-Route said): relayed to the
-- Request-URI (loose routing). The signature binds the dialog (Call-ID, From tag a1 as in
-- message(), To tag b1), the Request-URI's host and port and the Route after ours (none).
local sig = moonroute.route_signature{
  call_id = "lua-test-BYE@127.0.0.1", from_tag = "a1", to_tag = "b1",
  ruri = "sip:bob@127.0.0.1:5080",
}
r = moonroute.run{
  script = DEFAULT,
  message = message("BYE", "sip:bob@127.0.0.1:5080", "sip:alice@127.0.0.1:5060", "b1", {
    "Route: <sip:127.0.0.1:5060;transport=udp;lr;mrs=" .. sig .. ">",
  }),
}
assert(r.decision == "relay", r.decision)
assert(r.targets[1] == "sip:bob@127.0.0.1:5080", r.targets[1])

-- A Route naming us that we did not sign (no signature, or another dialog's), or ours for
-- another Request-URI host (the dialog's peer is not there), is not ours to follow: 404,
-- nothing relayed (else anyone could relay anywhere with a To tag).
local function signed_route(call_id, ruri)
  return "Route: <sip:127.0.0.1:5060;lr;mrs=" .. moonroute.route_signature{
    call_id = call_id, from_tag = "a1", to_tag = "t1", ruri = ruri,
  } .. ">"
end
for _, route in ipairs{
  "Route: <sip:127.0.0.1:5060;lr>",
  signed_route("other", "sip:victim@127.0.0.6:5060"),
  signed_route("lua-test-MESSAGE@127.0.0.1", "sip:x@127.0.0.4"),
} do
  r = moonroute.run{
    script = DEFAULT,
    message = message("MESSAGE", "sip:victim@127.0.0.6:5060", "sip:x@127.0.0.4", "t1", {route}),
  }
  assert(r.decision == "reply" and r.code == 404, route .. ": " .. tostring(r.code))
end
-- An expired signature routes a BYE only (so the dialog can still end).
local expired = "Route: <sip:127.0.0.1:5060;transport=udp;lr;mrs=" .. moonroute.route_signature{
  call_id = "lua-test-BYE@127.0.0.1", from_tag = "a1", to_tag = "b1",
  ruri = "sip:bob@127.0.0.1:5080", expires = os.time() - 60,
} .. ">"
r = moonroute.run{
  script = DEFAULT,
  message = message("BYE", "sip:bob@127.0.0.1:5080", "sip:alice@127.0.0.1:5060", "b1", {expired}),
}
assert(r.decision == "relay", r.decision)
r = moonroute.run{
  script = DEFAULT,
  message = message("BYE", "sip:bob@127.0.0.1:5080", "sip:alice@127.0.0.1:5060", "b1", {expired})
    :gsub("^BYE ", "INFO "):gsub("CSeq: 1 BYE", "CSeq: 1 INFO"),
}
assert(r.decision == "reply" and r.code == 404, tostring(r.code))

-- Per-transaction variables and header edits (vars.lua).
r = moonroute.run{
  script = "vars.lua", -- found next to this file
  location = LOCATION,
  message = message("INVITE", "sip:bob@127.0.0.1:5060", "sip:alice@127.0.0.1:5060"),
}
assert(r.decision == "relay" and #r.targets == 2)
assert(r.vars.caller == "sip:alice@127.0.0.1:5060", tostring(r.vars.caller))
assert(r.vars.method == "INVITE")
assert(r.vars.contacts == 2, tostring(r.vars.contacts))
assert(r.vars.voicemail == nil)
assert(contains(r.headers_added, "X-Caller: sip:alice@127.0.0.1:5060"), "X-Caller added")
assert(#r.logs == 1, "one log line")
assert(r.logs[1]:find("vars.lua:13: contacts found: 2", 1, true), r.logs[1])

r = moonroute.run{
  script = "vars.lua",
  location = LOCATION,
  message = message("INVITE", "sip:carol@127.0.0.1:5060", "sip:alice@127.0.0.1:5060"),
}
assert(r.vars.voicemail == true and r.vars.contacts == 0)
assert(r.targets[1] == "sip:voicemail@127.0.0.1:5090", r.targets[1])

-- A script error is reported, and the server would answer 500.
r = moonroute.run{
  script = "errors.lua",
  message = message("MESSAGE", "sip:bob@127.0.0.1:5060", "sip:alice@127.0.0.1:5060", nil, {
    "X-Test: boom",
  }),
}
assert(r.code == 500, tostring(r.code))
assert(r.error and r.error:find("errors.lua:7: boom", 1, true), tostring(r.error))

-- auth_challenge offers the algorithms moonroute has, or says which line asked for others.
for test, wanted in pairs{
  ["sha512"] = 'errors.lua:21: auth_challenge: algorithms must be a list of "SHA-256" or "MD5"',
  ["no algorithms"] = "errors.lua:23: auth_challenge: an empty list of algorithms",
} do
  r = moonroute.run{
    script = "errors.lua",
    message = message("MESSAGE", "sip:bob@127.0.0.1:5060", "sip:alice@127.0.0.1:5060", nil, {
      "X-Test: " .. test,
    }),
  }
  assert(r.code == 500, tostring(r.code))
  assert(r.error and r.error:find(wanted, 1, true), tostring(r.error))
end

-- ----- Digest authentication with a subscriber fixture ---------------------------------------

-- USER@DOMAIN PASSWORD [REALM]: plaintext, for tests only (the server's table holds HA1s).
local SUBSCRIBERS = [[
alice@127.0.0.1   alice-secret
carol@127.0.0.1   carol-secret
]]

-- A REGISTER of `aor` (To = From = the AOR), with extra header lines.
local function register(aor, extra)
  local lines = {
    "REGISTER sip:127.0.0.1:5060 SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-lua-reg",
    "Max-Forwards: 70",
    "From: <" .. aor .. ">;tag=r1",
    "To: <" .. aor .. ">",
    "Call-ID: lua-test-register@127.0.0.1",
    "CSeq: 1 REGISTER",
    "Contact: <sip:carol@127.0.0.1:5070>",
    "Expires: 600",
  }
  for _, line in ipairs(extra or {}) do
    lines[#lines + 1] = line
  end
  lines[#lines + 1] = "Content-Length: 0"
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

local CAROL = "sip:carol@127.0.0.1:5060"

-- First round: no credentials, a challenge (SHA-256 first, then MD5), nothing saved.
r = moonroute.run{script = DEFAULT, subscribers = SUBSCRIBERS, message = register(CAROL)}
assert(r.code == 401 and r.primitive == "auth_challenge", tostring(r.code))
local challenge, md5_challenge = r.reply_headers[1], r.reply_headers[2]
assert(md5_challenge:find("algorithm=MD5$"), md5_challenge)
assert(challenge:find("algorithm=SHA%-256$") and not challenge:find("stale"), challenge)

-- The answer with the right password: saved (200, the binding in the reply's Contact).
local function credentials(args)
  return moonroute.digest{
    challenge = args.challenge or challenge,
    user = args.user or "carol",
    password = args.password or "carol-secret",
    method = args.method or "REGISTER",
    uri = args.uri or "sip:127.0.0.1:5060",
    nc = 1,
  }
end
r = moonroute.run{
  script = DEFAULT,
  subscribers = SUBSCRIBERS,
  message = register(CAROL, {"Authorization: " .. credentials{}}),
}
assert(r.error == nil, r.error)
assert(r.code == 200 and r.primitive == "save", tostring(r.code) .. " " .. tostring(r.primitive))
assert(contains(r.reply_headers, "Contact: <sip:carol@127.0.0.1:5070>;expires=600"), r.reply_headers[1])

-- The MD5 challenge works as well.
r = moonroute.run{
  script = DEFAULT,
  subscribers = SUBSCRIBERS,
  message = register(CAROL, {"Authorization: " .. credentials{challenge = md5_challenge}}),
}
assert(r.code == 200, tostring(r.code))

-- A phone that gives up on a challenge offering SHA-256 (baresip before 3.12) is challenged
-- with MD5 alone; later versions, and other phones, with SHA-256 then MD5.
for agent, offered in pairs{
  ["baresip v1.0.0 (x86_64/linux)"] = "MD5",
  ["baresip v2.12.0 (armv7l/linux)"] = "MD5",
  ["baresip v3.11.0 (x86_64/linux)"] = "MD5",
  ["baresip v3.12.0 (x86_64/linux)"] = "SHA-256 MD5",
  ["baresip v10.0.0 (x86_64/linux)"] = "SHA-256 MD5",
  ["Linphone-Desktop/5.1.65 (belle-sip/5.1.65)"] = "SHA-256 MD5",
} do
  r = moonroute.run{
    script = DEFAULT,
    subscribers = SUBSCRIBERS,
    message = register(CAROL, {"User-Agent: " .. agent}),
  }
  assert(r.code == 401 and r.primitive == "auth_challenge", agent .. ": " .. tostring(r.code))
  local algorithms = {}
  for _, header in ipairs(r.reply_headers) do
    if header:find("^WWW%-Authenticate: ") then
      algorithms[#algorithms + 1] = header:match("algorithm=([%w-]+)$")
    end
  end
  assert(table.concat(algorithms, " ") == offered, agent .. ": " .. table.concat(algorithms, " "))
  -- Its answer registers it.
  local answer = credentials{challenge = r.reply_headers[1]}
  r = moonroute.run{
    script = DEFAULT,
    subscribers = SUBSCRIBERS,
    message = register(CAROL, {"User-Agent: " .. agent, "Authorization: " .. answer}),
  }
  assert(r.code == 200, agent .. ": " .. tostring(r.code))
end

-- The User-Agent narrows the offer, never what is accepted: SHA-256 credentials from a phone
-- calling itself baresip 1.0 are as good as any.
r = moonroute.run{
  script = DEFAULT,
  subscribers = SUBSCRIBERS,
  message = register(CAROL, {"User-Agent: baresip v1.0.0", "Authorization: " .. credentials{}}),
}
assert(r.code == 200, tostring(r.code))

-- A wrong password: challenged again (a fresh nonce, not stale).
r = moonroute.run{
  script = DEFAULT,
  subscribers = SUBSCRIBERS,
  message = register(CAROL, {"Authorization: " .. credentials{password = "guess"}}),
}
assert(r.code == 401 and r.primitive == "auth_challenge", tostring(r.code))
assert(not r.reply_headers[1]:find("stale"), r.reply_headers[1])

-- Valid credentials of another subscriber than the AOR registered: 403 (check_from).
r = moonroute.run{
  script = DEFAULT,
  subscribers = SUBSCRIBERS,
  message = register("sip:alice@127.0.0.1:5060", {"Authorization: " .. credentials{}}),
}
assert(r.code == 403 and r.reason == "Forbidden auth ID", tostring(r.code))

-- The same credentials an hour later: the nonce has expired (300 s), the response is right,
-- so the challenge says stale=true (the phone retries without asking its user).
r = moonroute.run{
  script = DEFAULT,
  subscribers = SUBSCRIBERS,
  time = os.time() + 3600,
  message = register(CAROL, {"Authorization: " .. credentials{}}),
}
assert(r.code == 401, tostring(r.code))
assert(r.reply_headers[1]:find(", stale=true"), r.reply_headers[1])

-- An INVITE from one of our users: 407 first, then relayed with the answer, and the
-- Proxy-Authorization (ours) removed before it goes on.
local invite = function(extra)
  return message("INVITE", "sip:bob@127.0.0.1:5060", "sip:alice@127.0.0.1:5060", nil, extra)
end
r = moonroute.run{script = DEFAULT, subscribers = SUBSCRIBERS, location = LOCATION, message = invite()}
assert(r.code == 407, tostring(r.code))
assert(r.reply_headers[1]:find("^Proxy%-Authenticate: "), r.reply_headers[1])
local authorization = "Proxy-Authorization: " .. credentials{
  challenge = r.reply_headers[1],
  user = "alice",
  password = "alice-secret",
  method = "INVITE",
  uri = "sip:bob@127.0.0.1:5060",
}
r = moonroute.run{
  script = DEFAULT,
  subscribers = SUBSCRIBERS,
  location = LOCATION,
  message = invite({authorization}),
}
assert(r.error == nil, r.error)
assert(r.decision == "relay" and #r.targets == 2, r.decision)
assert(contains(r.headers_removed, authorization), "the credentials are consumed")

-- A stranger's pre-loaded Route is removed before routing (issue 17): the MESSAGE goes to bob's
-- contacts, not to the host the stranger named (loose, strict, a TCP port, behind an unsigned
-- Route naming us), and default.lua says so in the log.
for _, route in ipairs{
  "<sip:127.0.0.9;lr>",
  "<sip:127.0.0.9>",
  "<sip:127.0.0.9:3306;transport=tcp;lr>",
  "<sip:127.0.0.1:5060;lr>, <sip:127.0.0.9;lr>",
} do
  r = moonroute.run{
    script = DEFAULT,
    location = LOCATION,
    source = "udp:192.0.2.66:5070",
    message = message("MESSAGE", "sip:bob@127.0.0.1:5060", "sip:eve@example.net", nil,
      {"Route: " .. route}),
  }
  assert(r.error == nil, r.error)
  assert(r.decision == "relay" and #r.targets == 2, route .. ": " .. r.decision)
  local left = route:gsub("^<sip:127%.0%.0%.1:5060;lr>, ", "")
  assert(contains(r.headers_removed, "Route: " .. left), route .. ": Route removed")
  assert(r.logs[1]:find("pre-loaded Route removed, not followed: " .. left, 1, true), r.logs[1])
end

-- Well-known scanners get no answer, whatever they ask (the reason goes to the log line).
for _, agent in ipairs{"friendly-scanner", "SIPVicious/0.3.4", "sipcli/v1.8", "VaxSIPUserAgent/3.1"} do
  r = moonroute.run{
    script = DEFAULT,
    location = LOCATION,
    message = message("INVITE", "sip:bob@127.0.0.1:5060", "sip:eve@example.net", nil,
      {"User-Agent: " .. agent}),
  }
  assert(r.decision == "drop", agent .. ": " .. r.decision)
  assert(r.reason:find("^scanner user agent "), r.reason)
end
