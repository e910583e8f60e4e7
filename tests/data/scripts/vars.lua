-- A routing script for the offline tests (tests/data/scripts/default_test.lua): it remembers
-- the caller in req.vars, tags the request and relays it to the registered contacts, or to a
-- voicemail URI when the user has none.

VOICEMAIL = "sip:voicemail@127.0.0.1:5090"

function on_request(req)
  req.vars.caller = req.from_uri
  req.vars.method = req.method
  local found = req:lookup("location")
  req.vars.contacts = found
  req:append_header("X-Caller", req.from_uri)
  sip.log("info", "contacts found:", found)
  if found == 0 then
    req.vars.voicemail = true
    return req:t_relay(VOICEMAIL)
  end
  return req:t_relay()
end
