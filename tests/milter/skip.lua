-- greygate through miltertest: an allow-listed client and an authenticated session
-- continue at once; an ordinary client in the same run is greylisted (the control).
-- Globals from the test (-D): port.

local function expect(what, got, want)
  if got ~= want then error(what .. ": reply " .. tostring(got) .. ", expected " .. tostring(want)) end
end
local function ok(what, err)
  if err ~= nil then error(what .. " failed: " .. err) end
end

local function session(ip, login)
  local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.25)
  if conn == nil then error("cannot connect to greygate's milter listener") end
  ok("conninfo", mt.conninfo(conn, "unknown", ip))
  expect("connect", mt.getreply(conn), SMFIR_CONTINUE)
  ok("helo", mt.helo(conn, "client.example.net"))
  expect("helo", mt.getreply(conn), SMFIR_CONTINUE)
  if login ~= nil then ok("macro", mt.macro(conn, SMFIC_MAIL, "{auth_authen}", login)) end
  ok("mailfrom", mt.mailfrom(conn, "<carol@example.net>"))
  expect("mail", mt.getreply(conn), SMFIR_CONTINUE)
  ok("rcptto", mt.rcptto(conn, "<dave@example.org>"))
  local reply = mt.getreply(conn)
  ok("disconnect", mt.disconnect(conn))
  return reply
end

expect("allow-listed client", session("198.51.100.7", nil), SMFIR_CONTINUE)
expect("authenticated session", session("203.0.113.9", "alice"), SMFIR_CONTINUE)
expect("ordinary client", session("203.0.113.10", nil), SMFIR_REPLYCODE)
