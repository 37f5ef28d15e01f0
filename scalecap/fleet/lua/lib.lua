-- Shared by every transition (prepended to each script when it is loaded).
-- KEYS, the same 11 for every script (built by BatchStore._keys; names in scalecap/fleet/layout.py);
-- each script's header says which of them it uses:
--   1 batch hash   2 job index (zset)   3 job states (hash: job id -> JSON)   4 webhook attempts
--   5 finished (zset)   6 outbox (list)   7 dead letters (list)   8 leases (zset)
--   9 unpublished (zset)   10 the batch queue's queued-images counter   11 owners (hash)
--   12 (claim_chunk only) this call's reply, kept so a resent claim answers alike
-- ARGV[1] batch id, ARGV[2] retention in seconds (0: keep).
-- One clock: "now" is Redis' TIME, read here; no script takes a time from its caller (a worker
-- or a reconciler with a skewed clock cannot move a deadline).
local B, RETENTION = ARGV[1], tonumber(ARGV[2])
local T = redis.call('TIME')
local NOW = tonumber(T[1]) + tonumber(T[2]) / 1000000
local NOWS = string.format('%.3f', NOW)
local REPLY_TTL = 120  -- seconds a claim's reply is kept for a resent claim
local DEAD_LETTER_CAP = 10000

local function is_final(s) return s == 'done' or s == 'failed' or s == 'cancelled' end

local function batch_exists() return redis.call('HEXISTS', KEYS[1], 'created_at') == 1 end

-- A reply kept under KEYS[12] (claim_chunk): the same claim resent (redis-py retries after a
-- lost reply) answers as the first did and changes nothing.
local function kept_reply()
  local raw = redis.call('GET', KEYS[12])
  if raw then return cjson.decode(raw) end
  return nil
end
local function keep_reply(out)
  redis.call('SET', KEYS[12], cjson.encode(out), 'EX', REPLY_TTL)
  return out
end

local function event_id(basis)
  return 'msg_' .. string.sub(redis.sha1hex(basis), 1, 32)
end

local function push_event(kind, job_id, seq)
  local basis = kind .. ':' .. B .. ':' .. (job_id or '') .. ':' .. (seq or '')
  local ev = {id = event_id(basis), type = kind, batch_id = B, at = NOWS}
  if job_id then ev.job_id = job_id end
  redis.call('RPUSH', KEYS[6], cjson.encode(ev))
end

local function load_job(j)
  local raw = redis.call('HGET', KEYS[3], j)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save_job(j, job)
  job.u = NOWS
  redis.call('HSET', KEYS[3], j, cjson.encode(job))
end

-- Counter moves are summed per script and applied once (one HINCRBY per counter that moved).
local moves = {}
local function move(from, to, n)
  n = n or 1
  if from then moves[from] = (moves[from] or 0) - n end
  if to then moves[to] = (moves[to] or 0) + n end
end
local function apply_moves()
  for k, v in pairs(moves) do
    if v ~= 0 then
      if k == '_queue' then redis.call('INCRBY', KEYS[10], v)
      else redis.call('HINCRBY', KEYS[1], k, v) end
    end
  end
  moves = {}
end

local function dead_letter(j, job, err, webhook_jobs)
  job.s = 'failed'; job.e = err; job.t = nil; job.d = nil
  save_job(j, job)
  redis.call('LPUSH', KEYS[7], cjson.encode({batch_id = B, job_id = j, ref = job.r,
                                            attempts = job.a, error = err}))
  redis.call('LTRIM', KEYS[7], 0, DEAD_LETTER_CAP - 1)
  move(nil, 'dead_lettered')
  if webhook_jobs then push_event('job.completed', j) end
end

local function set_retention(ttl)
  for i = 1, 4 do
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
  end
end

-- Sets finished_at exactly once, when submission is closed and every job is final; the
-- batch.completed event goes to the outbox in the same script (never lost between steps).
local function try_finish()
  local h = redis.call('HMGET', KEYS[1], 'closed', 'finished_at', 'total', 'done', 'failed',
                       'cancelled', 'webhook')
  if h[1] ~= '1' or h[2] then return false end
  local final = tonumber(h[4] or '0') + tonumber(h[5] or '0') + tonumber(h[6] or '0')
  if final < tonumber(h[3] or '0') then return false end
  redis.call('HSET', KEYS[1], 'finished_at', NOWS)
  redis.call('ZADD', KEYS[5], NOWS, B)
  if RETENTION > 0 then set_retention(RETENTION) end
  if h[7] and h[7] ~= '' then
    push_event('batch.completed', nil, redis.call('HINCRBY', KEYS[1], 'completions', 1))
  end
  return true
end
