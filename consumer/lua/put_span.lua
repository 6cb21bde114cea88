-- Store a span-context side, or recognise it, and return the results that wait for it.
-- KEYS[1] span string "<joined 0|1><identity>\n<body>"   KEYS[2] pending results hash {event_id -> record}
-- KEYS[3] expiring hash (sides the sweeper is reporting)
-- KEYS[4] (optional) the deadline index: when given, the span is indexed here, atomically; on a
--         Redis Cluster it lives in another slot, and the caller indexes afterwards.
-- ARGV[1] identity "trace_id:span_id"    ARGV[2] span body   ARGV[3] deadline ms   ARGV[4] index member
-- Returns {status, {event_id, record, ...}} with status stored | duplicate, or {"conflict", "<identity>\n<body>"}.
-- A plain string, not a hash: a span waits for the whole join TTL, and a hash costs ~170 bytes more.
local function index()
  -- GT: a redelivered side never pulls a deadline earlier; a republished one may push it later.
  if KEYS[4] then redis.call('ZADD', KEYS[4], 'GT', ARGV[3], ARGV[4]) end
end
local stored = redis.call('GET', KEYS[1])
if not stored then
  local expiring = redis.call('HGET', KEYS[3], 's')
  if expiring and string.sub(expiring, 1, #ARGV[1] + 1) == ARGV[1] .. '\n' then
    index()
    return {'duplicate', {}}
  end
  local pending = redis.call('HGETALL', KEYS[2])
  local joined = '0'
  if #pending > 0 then joined = '1' end
  redis.call('SET', KEYS[1], joined .. ARGV[1] .. '\n' .. ARGV[2])
  index()
  return {'stored', pending}
end
if string.sub(stored, 2, #ARGV[1] + 2) ~= ARGV[1] .. '\n' then
  return {'conflict', string.sub(stored, 2)}
end
-- A redelivered span: the results it joined may not have been delivered yet (a crash before the
-- commit), so they are returned again; the delivery ledger keeps them from being sent twice.
index()
return {'duplicate', redis.call('HGETALL', KEYS[2])}
