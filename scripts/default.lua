-- scripts/default.lua: the routing script moonroute runs when none is configured.
--
-- The Lua routing engine is not wired in yet. Until it is, the server itself answers OPTIONS
-- addressed to it with 200 and refuses every other request (501, or 416/420/483/400 when the
-- request calls for that). This file is already the configured default so that deployments keep
-- their path when the engine lands; its content will become the classic registrar + proxy.

function on_request(req)
end
