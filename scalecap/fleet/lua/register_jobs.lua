--[[ register_jobs: register a chunk of jobs and note it as not yet published, in one step.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   KEYS[2] job index   KEYS[3] job states   KEYS[9] unpublished
    KEYS[10] queued-images counter
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
    [3] chunk id   [4] queue   [5] its quarantine lane   [6..] triples (job id, ref, error JSON or '')
  Replies (outcomes.RegisterCode per job):
    {unpublished member or '', code per job}: 1 new (publish), 2 known and not final
    (publish again: its message may be lost), 3 new but failed (a bad row), 0 nothing to do
    (final already, or repeated within this call). A known job waiting in the quarantine lane
    is noted for that lane instead (due at once: the reconciler publishes it on its next pass).
]]
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local codes, pub, seen = {}, {}, {}
local new_q, new_f = 0, 0
local qpub = {}
for i = 6, #ARGV, 3 do
  local j, ref, err = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local code = 0
  if not seen[j] then
    seen[j] = true
    local job = {s = 'queued', r = ref, a = 0, n = 0, u = NOWS}
    if err ~= '' then job.s = 'failed'; job.e = cjson.decode(err) end
    if redis.call('HSETNX', KEYS[3], j, cjson.encode(job)) == 1 then
      redis.call('ZADD', KEYS[2], seq, j)
      seq = seq + 1
      if err ~= '' then new_f = new_f + 1; code = 3
      else new_q = new_q + 1; code = 1; pub[#pub + 1] = {j, ref} end
    elseif err == '' then
      local old = load_job(j)
      if old.s == 'queued' and old.q == 1 then code = 2; qpub[#qpub + 1] = {j, old.r}
      elseif not is_final(old.s) then code = 2; pub[#pub + 1] = {j, old.r} end
    end
  end
  codes[#codes + 1] = code
end
if new_q + new_f > 0 then
  redis.call('HSET', KEYS[1], 'seq', seq)
  move(nil, 'total', new_q + new_f)
  move(nil, 'queued', new_q)
  move(nil, 'failed', new_f)
  move(nil, '_queue', new_q)
  apply_moves()
end
local member = ''
if #pub > 0 then
  member = cjson.encode({c = ARGV[3], b = B, q = ARGV[4], jobs = pub})
  redis.call('ZADD', KEYS[9], NOWS, member)
end
if #qpub > 0 then  -- due at once: the reconciler's next pass publishes it to the quarantine lane
  redis.call('ZADD', KEYS[9], 0, cjson.encode({c = ARGV[3] .. ':q', b = B, q = ARGV[5], jobs = qpub}))
end
table.insert(codes, 1, member)
return codes
