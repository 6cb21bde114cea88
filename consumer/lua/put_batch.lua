-- Store the sides of a batch, or recognise them, in the order given: a span releases the results
-- that wait for it; a result joins its span if the span is here, else waits for it.
-- One call carries many sides (any number of join keys on a single Redis; one join key's sides on
-- a Redis Cluster, where every key of a call must share a slot), so a batch costs one command
-- instead of one per record.
--
-- ARGV[1] keys per side: 4, or 5 when the deadline index is given (a single Redis).
-- ARGV[2] the most results that may wait for one join key's span (0: no limit). Then per side:
--   "s", identity "trace_id:span_id", body, deadline ms, index member
--   "r", event_id, record, deadline ms, index member, n, n evaluation ids
-- KEYS per side: span string "<joined 0|1><identity>\n<body>", pending results hash
--   {event_id -> record}, expiring hash (sides the sweeper is reporting), delivery ledger,
--   [deadline index]. A span is a plain string, not a hash: it waits for the whole join TTL, and a
--   hash costs about 170 bytes more per key.
-- Returns one reply per side:
--   span:   {"stored" | "duplicate", {event_id, record, ...}} or {"conflict", "<identity>\n<body>"}
--   result: {"joined", "<span identity>\n<span body>"} | {"buffered"} | {"duplicate"}
--           | {"full"} (ARGV[2] results already wait for this join key: not stored)
-- A stored side is entered in the deadline index in the same call when the index key is given
-- (GT: a redelivered side never pulls a deadline earlier; a republished one may push it later).

local function index(k, deadline, member)
  if k.index then redis.call('ZADD', k.index, 'GT', deadline, member) end
end

local function put_span(k, identity, body, deadline, member)
  local stored = redis.call('GET', k.span)
  if not stored then
    local expiring = redis.call('HGET', k.expiring, 's')
    if expiring and string.sub(expiring, 1, #identity + 1) == identity .. '\n' then
      index(k, deadline, member)
      return {'duplicate', {}}
    end
    local pending = redis.call('HGETALL', k.pending)
    local joined = '0'
    if #pending > 0 then joined = '1' end
    redis.call('SET', k.span, joined .. identity .. '\n' .. body)
    index(k, deadline, member)
    return {'stored', pending}
  end
  if string.sub(stored, 2, #identity + 2) ~= identity .. '\n' then
    return {'conflict', string.sub(stored, 2)}
  end
  -- A redelivered span: the results it joined may not have been delivered yet (a crash before the
  -- commit), so they are returned again; the delivery ledger keeps them from being sent twice.
  index(k, deadline, member)
  return {'duplicate', redis.call('HGETALL', k.pending)}
end

local max_pending = tonumber(ARGV[2])

local function put_result(k, event_id, record, deadline, member, eval_ids)
  local span = redis.call('GET', k.span)
  if span then
    if string.sub(span, 1, 1) ~= '1' then redis.call('SETRANGE', k.span, 0, '1') end
    return {'joined', string.sub(span, 2)}
  end
  if redis.call('HEXISTS', k.pending, event_id) == 1 or redis.call('HEXISTS', k.expiring, 'r:' .. event_id) == 1 then
    index(k, deadline, member)
    return {'duplicate'}
  end
  -- Already delivered (or dead-lettered) in full, e.g. redelivered after its span expired: nothing to do.
  if #eval_ids > 0 then
    local settled = true
    for _, eval_id in ipairs(eval_ids) do
      local state = redis.call('HGET', k.ledger, eval_id)
      if not state or (state ~= 'd' and state ~= 'x') then settled = false break end
    end
    if settled then
      index(k, deadline, member)
      return {'duplicate'}
    end
  end
  -- A span releases all of its waiting results in one reply: their number is bounded, or one join key
  -- flooded with distinct results would grow without limit and then exhaust the consumer's memory.
  if max_pending > 0 and redis.call('HLEN', k.pending) >= max_pending then return {'full'} end
  redis.call('HSET', k.pending, event_id, record)
  index(k, deadline, member)
  return {'buffered'}
end

local per = tonumber(ARGV[1])
local out = {}
local a = 3
for base = 0, #KEYS - 1, per do
  local k = {span = KEYS[base + 1], pending = KEYS[base + 2], expiring = KEYS[base + 3], ledger = KEYS[base + 4]}
  if per == 5 then k.index = KEYS[base + 5] end
  if ARGV[a] == 's' then
    out[#out + 1] = put_span(k, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
    a = a + 5
  else
    local n = tonumber(ARGV[a + 5])
    local eval_ids = {}
    for j = 1, n do eval_ids[j] = ARGV[a + 5 + j] end
    out[#out + 1] = put_result(k, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], eval_ids)
    a = a + 6 + n
  end
end
return out
