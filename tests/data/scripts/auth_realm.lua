-- tests/auth.rs: a registrar whose realm ("voip") is not its domain (moonroute.test), as for
-- subscribers added with `ctl user add USER@moonroute.test --realm voip`.
function on_request(req)
  if not req:is_method("REGISTER") then
    return req:reply(405, "Method Not Allowed")
  end
  if not req:authorize("voip") then
    return req:auth_challenge("voip")
  end
  if not req:check_from() then
    return req:reply(403, "Forbidden auth ID")
  end
  req:consume_credentials()
  return req:save("location")
end
