--[[ maintenance_lock: a lock re-entrant for its owner, with an atomic compare-and-delete release.
  A lock SET whose reply was lost (a proxy dropping replies, Redis killed mid-pass) leaves the key
  holding its owner's id: that owner takes it again at once, anybody else after the TTL.
  Loaded alone (no lib.lua).
  KEYS:
    KEYS[1] the lock
  ARGV:
    [1] 'take' | 'release'   [2] the owner's id   [3] TTL in milliseconds ('take')
  Replies:
    1 taken (new, or already ours: its TTL restarts) / released; 0 held by another (or not ours)
]]
if ARGV[1] == 'take' then
  if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
  if redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
  end
  return 0
end
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
