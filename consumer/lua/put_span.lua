-- Store a span-context side, or recognise it, and return the results that wait for it.
-- KEYS[1] span hash {id, body, joined}   KEYS[2] pending results hash {event_id -> record}
-- KEYS[3] expiring hash (sides the sweeper is reporting)
-- ARGV[1] identity "trace_id:span_id"    ARGV[2] span record
-- Returns {status, {event_id, record, ...}} with status stored | duplicate, or {"conflict", existing body}.
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  local expiring = redis.call('HGET', KEYS[3], 's')
  if expiring and string.sub(expiring, 1, #ARGV[1] + 1) == ARGV[1] .. '\n' then
    return {'duplicate', {}}
  end
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'body', ARGV[2])
  id = ARGV[1]
  local pending = redis.call('HGETALL', KEYS[2])
  if #pending > 0 then redis.call('HSET', KEYS[1], 'joined', '1') end
  return {'stored', pending}
end
if id ~= ARGV[1] then
  return {'conflict', redis.call('HGET', KEYS[1], 'body')}
end
-- A redelivered span: the results it joined may not have been delivered yet (a crash before the
-- commit), so they are returned again; the delivery ledger keeps them from being sent twice.
return {'duplicate', redis.call('HGETALL', KEYS[2])}
