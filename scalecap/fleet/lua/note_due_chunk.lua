--[[ note_due_chunk: note a chunk in `unpublished`, due `delay` seconds from Redis' now (a chunk
  this worker did not claim because its sink is down). Its message is then acknowledged; the I/O
  worker publishes the note when due (take_due_chunk), so no message carries an ETA by a sender's
  clock. Loaded alone (no lib.lua).
  KEYS:
    KEYS[1] unpublished (zset: chunk JSON -> due)
  ARGV:
    [1] delay in seconds   [2] the chunk's JSON (its id ends in ':r', a retry note)
  Replies:
    the due time (Redis seconds, a string)
]]
local t = redis.call('TIME')
local due = string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1]))
redis.call('ZADD', KEYS[1], due, ARGV[2])
return due
