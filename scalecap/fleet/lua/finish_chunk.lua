--[[ finish_chunk: apply a chunk's outcomes, only where the job still holds this run's token;
  drop the lease.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   KEYS[3] job states   KEYS[5] finished   KEYS[6] outbox
    KEYS[7] dead letters   KEYS[8] leases   KEYS[9] unpublished   KEYS[10] queued-images counter
    KEYS[1..4] get their TTL if this finished the batch
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
    [3] attempt token   [4] lease member   [5] max attempts   [6] record index TTL (0: none)
    [7] record index key prefix   [8] the queue for retries   [9] seconds until retries are due
    [10] sink   [11..] per job 4: job id, outcome (outcomes.RunOutcome), location, error JSON
    Outcomes: done / failed: final, with the record's location (the winning run's: results,
    export and the viewer read only this location) and error; retry: a failure of this job,
    one attempt charged, dead-lettered at max attempts; requeue: not the job's fault (its sink
    is down), queued again, never charged and never dead-lettered (the worker stops claiming
    for that sink until it answers).
  Replies:
    {batch reply (outcomes.BatchReply: 'completed' | 'ok' | 'missing'), retry member or '',
     per job (outcomes.FinishCode): ok | stale | dead}; 'missing' (the batch was purged)
    writes nothing but dropping the lease. The run whose finish applied is kept in the job
    (`w`), so the same finish resent after a lost reply answers ok for it and counts nothing
    stale (its retry member, if the first reply was lost, is published by the reconciler).
  Events: job.completed per job made final (webhook_jobs), batch.completed if that finished it.
]]
local token, max_attempts, ttl = ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6])
if not batch_exists() then
  redis.call('ZREM', KEYS[8], ARGV[4])
  local out = {'missing', ''}
  for _ = 11, #ARGV, 4 do out[#out + 1] = 'stale' end
  return out
end
local webhook_jobs = redis.call('HGET', KEYS[1], 'webhook_jobs') == '1'
local out, again = {}, {}
local stale, ended = 0, false
for i = 11, #ARGV, 4 do
  local j, outcome, loc, err = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local job = load_job(j)
  local code = 'ok'
  if job and job.w == token and job.t ~= token then
    code = 'ok'  -- this run's finish, resent after a lost reply: applied already, not stale
  elseif not job or job.s ~= 'running' or job.t ~= token then
    code = 'stale'; stale = stale + 1
  else
    job.t = nil; job.d = nil; job.q = nil; job.w = token
    local e = nil
    if err ~= '' then e = cjson.decode(err) end
    if outcome == 'done' or outcome == 'failed' then
      job.s = outcome; job.e = e
      if loc ~= '' then job.l = loc end
      save_job(j, job)
      move('running', outcome)
      if outcome == 'done' and loc ~= '' then
        local entry = cjson.encode({sink = ARGV[10], location = loc})
        if ttl > 0 then redis.call('SET', ARGV[7] .. j, entry, 'EX', ttl)
        else redis.call('SET', ARGV[7] .. j, entry) end
      end
      if webhook_jobs then push_event('job.completed', j) end
      ended = true
    else
      if outcome == 'retry' then job.a = (job.a or 0) + 1 end
      job.e = e
      if outcome == 'retry' and job.a >= max_attempts then
        move('running', 'failed')
        dead_letter(j, job, e, webhook_jobs)
        code, ended = 'dead', true
      else
        job.s = 'queued'
        save_job(j, job)
        move('running', 'queued'); move(nil, '_queue')
        again[#again + 1] = {j, job.r}
      end
    end
  end
  out[#out + 1] = code
end
if stale > 0 then move(nil, 'stale_results', stale) end
apply_moves()
redis.call('ZREM', KEYS[8], ARGV[4])
local rmember = ''
if #again > 0 then
  rmember = cjson.encode({c = token .. ':r', b = B, q = ARGV[8], jobs = again})
  redis.call('ZADD', KEYS[9], string.format('%.3f', NOW + tonumber(ARGV[9])), rmember)
end
local result = 'ok'
if ended and try_finish() then result = 'completed' end
table.insert(out, 1, rmember)
table.insert(out, 1, result)
return out
