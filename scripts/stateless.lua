-- moonroute stateless forwarder and load balancer (RFC 3261 §16.11): every request goes to
-- one of NEXT_HOPS (its Request-URI unchanged), chosen by a hash of its Call-ID so that all requests of a call (INVITE,
-- ACK, CANCEL, BYE) take the same way. No transaction is kept: retransmissions are forwarded
-- again, and responses find their way back by their Via headers alone.
--
-- Run it with: cargo run --release -- run --script scripts/stateless.lua
-- and edit NEXT_HOPS to point at your servers.

NEXT_HOPS = {
  "sip:127.0.0.1:5080",
  "sip:127.0.0.1:5081",
}

-- A small string hash (djb2), enough to spread Call-IDs evenly.
local function hash(text)
  local h = 5381
  for i = 1, #text do
    h = (h * 33 + text:byte(i)) % 4294967296
  end
  return h
end

function on_request(req)
  -- Inside a dialog the Request-URI (or the Route set) already names the next hop. An ACK
  -- for a non-2xx answer carries a To tag too, but belongs to the INVITE's hop (§17.1.1.3),
  -- so it takes the same hash as the INVITE below.
  if req:has_to_tag() and not req:is_method("ACK") then
    -- The Route set a UA sends here is followed as it came (the engine would remove it, see
    -- req:follow_preloaded_route() in docs/scripting.md): this forwarder serves the network
    -- in front of NEXT_HOPS and relays what it is sent, so keep it off the open internet.
    req:follow_preloaded_route()
    return req:forward()
  end
  local hop = NEXT_HOPS[hash(req.call_id or "") % #NEXT_HOPS + 1]
  return req:forward(hop)
end
