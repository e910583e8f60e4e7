-- A registrar and stateless proxy that record-routes (tests/protocol/route_signature.rs): calls to a
-- registered user are forwarded statelessly (§16.11) to the first contact; in-dialog requests
-- follow our signed Route, or get 404.
function on_request(req)
  if req:has_to_tag() then
    if req:loose_route() then
      return req:forward()
    end
    if req:is_method("ACK") then
      return req:drop()
    end
    return req:reply(404, "Not Here")
  end
  if req:is_method("REGISTER") then
    return req:save("location")
  end
  if req:lookup("location") == 0 then
    return req:reply(404, "Not Found")
  end
  req:record_route()
  return req:forward()
end
