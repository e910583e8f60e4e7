-- tests/nat.rs: RFC 3581 rport asked for by the script (with [nat] force_rport = false).
function on_request(req)
  if req:header("X-Force-Rport") then
    req:force_rport()
  end
  return req:reply(404, "Not Found")
end
