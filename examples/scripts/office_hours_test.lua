-- Offline tests of examples/scripts/office_hours.lua:
--   moonroute test --lua examples/scripts/office_hours_test.lua     (from the repository root)
-- `time` is the moment the run pretends it is (seconds since the epoch, UTC), for
-- sip.time.match and os.time alike.

local SCRIPT = "examples/scripts/office_hours.lua"
local LOCATION = [[
sip:office@127.0.0.1:5060  sip:desk1@127.0.0.1:5081  q=1.0
sip:office@127.0.0.1:5060  sip:desk2@127.0.0.1:5082  q=0.5
]]
local INVITE = [[
INVITE sip:sales@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-office
Max-Forwards: 70
From: <sip:customer@127.0.0.9>;tag=c1
To: <sip:sales@127.0.0.1:5060>
Call-ID: office-test@127.0.0.9
CSeq: 1 INVITE
Content-Length: 0
]]

-- Seconds since the epoch of a UTC date and time (whatever the machine's zone).
local function utc(y, m, d, hh, mm)
  if m <= 2 then y = y - 1 end
  local era = y // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  local days = era * 146097 + doe - 719468
  return days * 86400 + hh * 3600 + mm * 60
end

local function call_at(time, kv)
  return moonroute.run{ script = SCRIPT, location = LOCATION, message = INVITE, time = time,
                        kv = kv }
end

local function to_office(r)
  return r.code == 302 and r.primitive == "redirect"
    and r.reply_headers[1] == "Contact: <sip:desk1@127.0.0.1:5081>"
    and r.reply_headers[2] == "Contact: <sip:desk2@127.0.0.1:5082>;q=0.5"
end

local function to_on_call(r)
  return r.code == 302 and r.primitive == "reply"
    and r.reply_headers[1] == "Contact: <sip:+33600000000@127.0.0.1:5091>"
end

-- Monday 7 December 2026 (winter, Paris is UTC+1).
assert(to_office(call_at(utc(2026, 12, 7, 7, 0))))      -- 08:00 in Paris: open
assert(to_on_call(call_at(utc(2026, 12, 7, 6, 59))))    -- 07:59: not yet
assert(to_on_call(call_at(utc(2026, 12, 7, 11, 45))))   -- 12:45: lunch
assert(to_office(call_at(utc(2026, 12, 7, 16, 59))))    -- 17:59
assert(to_on_call(call_at(utc(2026, 12, 7, 17, 0))))    -- 18:00: closed
assert(to_office(call_at(utc(2026, 12, 12, 8, 30))))    -- Saturday 09:30
assert(to_on_call(call_at(utc(2026, 12, 12, 11, 0))))   -- Saturday 12:00
assert(to_on_call(call_at(utc(2026, 12, 13, 10, 0))))   -- Sunday
-- Summer: Paris is UTC+2, 06:30 UTC is 08:30 there.
assert(to_office(call_at(utc(2026, 7, 6, 6, 30))))
-- Closed for the day by the operator.
assert(to_on_call(call_at(utc(2026, 12, 7, 9, 0), { ["office:closed"] = 1 })))
-- No desk phone registered: the mobile.
local r = moonroute.run{ script = SCRIPT, message = INVITE, time = utc(2026, 12, 7, 9, 0) }
assert(to_on_call(r), tostring(r.code))
-- Not for us: refused.
r = moonroute.run{ script = SCRIPT, message = INVITE:gsub("INVITE sip:sales@127.0.0.1:5060",
  "INVITE sip:sales@127.0.0.9") }
assert(r.code == 403, tostring(r.code))
