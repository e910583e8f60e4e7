-- What a script error does to a running server (tests/scripts.rs): the request that hit it
-- gets 500 and the next one is served normally. The X-Test header picks the failure.

function on_request(req)
  local what = req:header("X-Test")
  if what == "boom" then
    error("boom")
  elseif what == "loop" then
    while true do end
  elseif what == "hog" then
    local t = {}
    for i = 1, 1e9 do
      t[i] = i
    end
  elseif what == "twice" then
    req:reply(202)
    return req:reply(203)
  elseif what == "undecided" then
    return
  elseif what == "sha512" then
    return req:auth_challenge(nil, { "SHA-512-256" })
  elseif what == "no algorithms" then
    return req:auth_challenge(nil, {})
  end
  return req:reply(200, "Fine")
end
