--[[
  Store the sides of a batch, or recognise them, in the order given: a span releases the results
  that wait for it; a result joins its span if the span is here, else waits for it.
  One call carries many sides (any number of join keys on a single Redis; one join key's sides on
  a Redis Cluster, where every key of a call must share a slot), so a batch costs one command
  instead of one per record.

  Input:
    KEYS, keys_per_side of them per side, in the order of the sides:
      span        string "<joined 0|1><identity>\n<body>". A plain string, not a hash: it waits
                  for the whole join TTL, and a hash costs about 170 bytes more per key.
      pending     hash event_id -> record: results waiting for the span
      expiring    hash "s" | "r:<event_id>" -> copy: sides the sweeper is reporting (expire_side.lua)
      ledger      hash eval_id -> delivery state (claim_batch.lua)
      index       the deadline index shard of the join key; only when keys_per_side is 5
    ARGV[1] keys_per_side   4, or 5 when the deadline index is given (a single Redis)
    ARGV[2] max_pending     the most results that may wait for one join key's span (0: no limit)
    then per side, read by arg_reader:
      a span:    "s", identity ("trace_id:span_id"), body, deadline_ms, member
      a result:  "r", event_id, record, deadline_ms, member, eval_ids (a counted list)
      (member: the side's name in the deadline index)

  Output, one reply per side:
    a span:    {"stored" | "duplicate", {event_id, record, ...}: the results that join it}
               | {"conflict", "<identity>\n<body>" of the span already bound to the join key}
    a result:  {"joined", "<span identity>\n<span body>"} | {"buffered"} | {"duplicate"}
               | {"full"}: max_pending results already wait for this join key; not stored

  A stored side is entered in the deadline index in the same call when the index key is given
  (GT: a redelivered side never pulls a deadline earlier; a republished one may push it later).
]]
local keys_per_side = tonumber(ARGV[1])
local max_pending = tonumber(ARGV[2])
--- @include "arg_reader"
local next_arg, next_list = arg_reader(3)

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

local out = {}
for base = 0, #KEYS - 1, keys_per_side do
  local k = {span = KEYS[base + 1], pending = KEYS[base + 2], expiring = KEYS[base + 3], ledger = KEYS[base + 4]}
  if keys_per_side == 5 then k.index = KEYS[base + 5] end
  -- One read per line: Lua does not promise the order in which a call's arguments are evaluated.
  if next_arg() == 's' then
    local identity = next_arg()
    local body = next_arg()
    local deadline = next_arg()
    local member = next_arg()
    out[#out + 1] = put_span(k, identity, body, deadline, member)
  else
    local event_id = next_arg()
    local record = next_arg()
    local deadline = next_arg()
    local member = next_arg()
    local eval_ids = next_list()
    out[#out + 1] = put_result(k, event_id, record, deadline, member, eval_ids)
  end
end
return out
