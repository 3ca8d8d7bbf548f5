-- greygate through miltertest: the first RCPT of a new triplet is tempfailed with a custom
-- reply; after the delay the retry continues and end of message adds X-Greylist.
-- Globals from the test (-D): port, delay.

local conn = mt.connect("inet:" .. port .. "@127.0.0.1", 20, 0.25)
if conn == nil then error("cannot connect to greygate's milter listener") end
mt.set_timeout(10)

local function expect(what, got, want)
  if got ~= want then error(what .. ": reply " .. tostring(got) .. ", expected " .. tostring(want)) end
end
local function ok(what, err)
  if err ~= nil then error(what .. " failed: " .. err) end
end

ok("conninfo", mt.conninfo(conn, "mail.example.net", "192.0.2.10"))
expect("connect", mt.getreply(conn), SMFIR_CONTINUE)
ok("helo", mt.helo(conn, "client.example.net"))
expect("helo", mt.getreply(conn), SMFIR_CONTINUE)

-- First attempt: greylisted.
ok("mailfrom", mt.mailfrom(conn, "<alice@example.net>"))
expect("mail", mt.getreply(conn), SMFIR_CONTINUE)
ok("rcptto", mt.rcptto(conn, "<bob@example.org>"))
expect("first rcpt", mt.getreply(conn), SMFIR_REPLYCODE)
ok("abort", mt.abort(conn))

-- An early retry: greylisted again.
ok("mailfrom", mt.mailfrom(conn, "<alice@example.net>"))
expect("mail", mt.getreply(conn), SMFIR_CONTINUE)
ok("rcptto", mt.rcptto(conn, "<bob@example.org>"))
expect("early retry", mt.getreply(conn), SMFIR_REPLYCODE)
ok("abort", mt.abort(conn))

-- After the delay: accepted, and the message is marked.
mt.sleep(tonumber(delay) + 0.5)
ok("mailfrom", mt.mailfrom(conn, "<alice@example.net>"))
expect("mail", mt.getreply(conn), SMFIR_CONTINUE)
ok("rcptto", mt.rcptto(conn, "<bob@example.org>"))
expect("retry after the delay", mt.getreply(conn), SMFIR_CONTINUE)
ok("eom", mt.eom(conn))
expect("eom", mt.getreply(conn), SMFIR_CONTINUE)
if not mt.eom_check(conn, MT_HDRADD, "X-Greylist") then error("no X-Greylist header added") end
local value = mt.getheader(conn, "X-Greylist", 0)
if value == nil or not string.find(value, "^delayed %d+ seconds by greygate%-") then
  error("X-Greylist value: " .. tostring(value))
end
mt.echo("X-Greylist: " .. value)
ok("disconnect", mt.disconnect(conn))
