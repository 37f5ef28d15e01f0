--[[ claim_chunk: claim a chunk of jobs for one run: one attempt token, one lease.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   KEYS[3] job states   KEYS[5] finished   KEYS[6] outbox
    KEYS[7] dead letters   KEYS[8] leases   KEYS[9] unpublished   KEYS[10] queued-images counter
    KEYS[12] this call's kept reply (a resent claim with the same token answers alike)
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
    [3] attempt token   [4] lease seconds   [5] max attempts   [6] '1' in the quarantine lane
    [7] the quarantine queue   [8] record index key prefix   [9..] job ids
  Replies (outcomes.ClaimCode):
    {'missing'} when the batch does not exist; else
    {lease member or '', quarantine member or '', then per job: code, detail}, code one of
      run (detail: the record index entry or ''), final, busy (another run holds a live
      lease), skip (waits for its quarantine message), quarantined (a run was lost: sent to
      the quarantine lane, not charged), dead (dead-lettered), cancelled, missing.
  A run that was lost outside the quarantine lane charges nobody: its job runs again alone in
  the quarantine lane, and only a loss there charges an attempt.
  Events: job.completed per job settled (webhook_jobs), batch.completed if that finished it.
]]
local kept = kept_reply()
if kept then return kept end
local token, max_attempts = ARGV[3], tonumber(ARGV[5])
local deadline = string.format('%.3f', NOW + tonumber(ARGV[4]))
local quarantine = ARGV[6] == '1'
local h = redis.call('HMGET', KEYS[1], 'created_at', 'cancel_requested', 'webhook_jobs')
if not h[1] then return {'missing'} end
local cancel, webhook_jobs = h[2] == '1', h[3] == '1'
local out, ran, lost = {}, {}, {}
local ended = false
for i = 9, #ARGV do
  local j = ARGV[i]
  local job = load_job(j)
  local code, detail = 'missing', ''
  if job then
    local live = job.s == 'running' and tonumber(job.d or '0') > NOW
    if is_final(job.s) then code = 'final'
    elseif live then code = 'busy'
    elseif cancel then
      move(job.s, 'cancelled')
      if job.s == 'queued' then move('_queue', nil) end
      job.s = 'cancelled'; job.t = nil; job.d = nil
      save_job(j, job)
      if webhook_jobs then push_event('job.completed', j) end
      code, ended = 'cancelled', true
    elseif job.s == 'running' and not quarantine and job.q == 1 and job.a + 1 >= max_attempts then
      job.a = job.a + 1  -- its lone run was lost, and that was its last attempt
      move('running', 'failed')
      dead_letter(j, job, {stage = 'queue', type = 'WorkerLost',
        message = 'the worker was lost ' .. job.a .. ' time(s) while running this job alone'},
        webhook_jobs)
      code, ended = 'dead', true
    elseif job.s == 'running' and not quarantine then
      if job.q == 1 then job.a = job.a + 1 end  -- a lone run was lost: charged
      job.q = 1; job.s = 'queued'; job.t = nil; job.d = nil
      save_job(j, job)
      move('running', 'queued'); move(nil, '_queue')
      lost[#lost + 1] = {j, job.r}
      code = 'quarantined'
    elseif job.s == 'queued' and job.q == 1 and not quarantine then code = 'skip'
    else
      if job.s == 'running' and job.q == 1 then job.a = (job.a or 0) + 1 end  -- lost alone: charged
      if job.a >= max_attempts then
        local err = job.e
        if job.s == 'running' then
          err = {stage = 'queue', type = 'WorkerLost',
                 message = 'the worker was lost ' .. job.a .. ' time(s) while running this job alone'}
        end
        move(job.s, 'failed')
        if job.s == 'queued' then move('_queue', nil) end
        dead_letter(j, job, err, webhook_jobs)
        code, ended = 'dead', true
      else
        if job.s == 'queued' then move('queued', 'running'); move('_queue', nil) end
        if quarantine then job.q = 1 end
        job.s = 'running'; job.t = token; job.d = deadline; job.n = (job.n or 0) + 1
        save_job(j, job)
        ran[#ran + 1] = j
        code = 'run'
        detail = redis.call('GET', ARGV[8] .. j) or ''
      end
    end
  end
  out[#out + 1] = code
  out[#out + 1] = detail
end
apply_moves()
local lease, qmember = '', ''
if #ran > 0 then
  lease = cjson.encode({b = B, t = token, jobs = ran})
  redis.call('ZADD', KEYS[8], deadline, lease)
  redis.call('HSETNX', KEYS[1], 'started_at', NOWS)
end
if #lost > 0 then
  qmember = cjson.encode({c = token .. ':q', b = B, q = ARGV[7], jobs = lost})
  redis.call('ZADD', KEYS[9], NOWS, qmember)
end
if ended then try_finish() end
table.insert(out, 1, qmember)
table.insert(out, 1, lease)
return keep_reply(out)
