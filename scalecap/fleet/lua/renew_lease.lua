--[[ renew_lease: a worker's lease keeper extends the lease of a run still making progress.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[3] job states   KEYS[8] leases
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
    [3] attempt token   [4] lease member   [5] lease seconds   [6..] job ids
  Replies (outcomes.LeaseReply):
    {'held', jobs still held}: each job that still holds the token gets deadline now + lease
    seconds, and so does the lease; {'lost', 0}: no job holds the token any more (the lease was
    taken back, the batch purged): the run must stop and write nothing.
]]
local token = ARGV[3]
local deadline = string.format('%.3f', NOW + tonumber(ARGV[5]))
local held = 0
for i = 6, #ARGV do
  local j = ARGV[i]
  local job = load_job(j)
  if job and job.s == 'running' and job.t == token then
    job.d = deadline
    redis.call('HSET', KEYS[3], j, cjson.encode(job))
    held = held + 1
  end
end
if held == 0 then return {'lost', 0} end
redis.call('ZADD', KEYS[8], 'XX', deadline, ARGV[4])
return {'held', held}
