-- The routing of scripts/default.lua without authentication and flood checks (what the
-- benchmarks run through moonroute), in Kamailio's KEMI Lua: sanity and Max-Forwards checks,
-- retransmission absorption, in-dialog routing by Record-Route, registrar save, location
-- lookup, record-route and stateful relay.

function ksr_request_route()
  if KSR.maxfwd.process_maxfwd(10) < 0 then
    KSR.sl.sl_send_reply(483, "Too Many Hops")
    return 1
  end
  if KSR.sanity.sanity_check(1511, 7) < 0 then
    return 1
  end
  if KSR.is_CANCEL() then
    if KSR.tm.t_check_trans() > 0 then
      relay()
    end
    return 1
  end
  if not KSR.is_ACK() then
    if KSR.tmx.t_precheck_trans() > 0 then
      KSR.tm.t_check_trans()
      return 1
    end
    if KSR.tm.t_check_trans() == 0 then
      return 1
    end
  end
  if KSR.siputils.has_totag() > 0 then
    if KSR.rr.loose_route() > 0 then
      relay()
      return 1
    end
    if KSR.is_ACK() then
      if KSR.tm.t_check_trans() > 0 then
        relay()
      end
      return 1
    end
    KSR.sl.sl_send_reply(404, "Not Here")
    return 1
  end
  KSR.hdr.remove("Route")
  if KSR.is_REGISTER() then
    if KSR.registrar.save("location", 0) < 0 then
      KSR.sl.sl_reply_error()
    end
    return 1
  end
  if KSR.is_method_in("IS") then
    KSR.rr.record_route()
  end
  if KSR.registrar.lookup("location") < 0 then
    KSR.sl.send_reply(404, "Not Found")
    return 1
  end
  relay()
  return 1
end

function relay()
  if KSR.tm.t_relay() < 0 then
    KSR.sl.sl_reply_error()
  end
end
