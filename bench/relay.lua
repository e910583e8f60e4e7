-- The routing script of bench/calls.sh ROUTER=script and bench/reload.sh: a stateful proxy
-- relaying every new request to the UAS SIPp (@UAS_PORT@ is filled in by the bench script).
-- A MESSAGE to sip:version@... is answered with the script's VERSION as reason phrase, so
-- bench/reload.sh can see when a reload went live.
VERSION = "v0"
UAS = "sip:127.0.0.1:@UAS_PORT@"

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
  if req:is_method("MESSAGE") and req.ruri_user == "version" then
    return req:reply(200, VERSION)
  end
  req:record_route()
  return req:t_relay(UAS)
end
