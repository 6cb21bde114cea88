--[[
  Store the sides of a batch, or recognise them, in the order given: a span takes the results that
  wait for it; a result joins its span if the span is here (and, without a run, does not have this
  evaluation yet), else waits for it. The rules are JoinStore.put_many's (consumer/store.py).
  One call carries many sides (any number of join keys on a single Redis; one join key's sides on
  a Redis Cluster, where every key of a call must share a slot), so a batch costs one command
  instead of one per record.

  Input:
    KEYS, keys_per_side of them per side, in the order of the sides:
      span        string: "0<identity>\n<body>" (no result joined it), "1<identity>\n<body>" (results
                  joined it: a namespace with a run, or stored before books), or
                  "b<book>\30<identity>\n<body>": results joined it, and the book says which, one
                  16-character entry each of its slots: <slot><result digest> (8 + 8 hex characters).
                  A plain string, not a hash: it waits for the whole join TTL, and a hash costs
                  about 170 bytes more per key.
      pending     hash event_id -> record: results waiting for a span, and results a span took that
                  are not delivered yet. Without a run: "\2<slots>\30<record>", slots 8 characters each.
      expiring    hash "s" | "r:<event_id>" -> copy: sides the sweeper is reporting (expire_side.lua)
      replaced    string, as span: the span the current one replaced, kept with its book
      ledger      hash eval_id -> delivery state (claim_batch.lua)
      index       the deadline index shard of the join key; only when keys_per_side is 6
    then one more key, last: usage, the usage hash of every side's ml_app (lua/usage.lua)
    ARGV[1] keys_per_side   5, or 6 when the deadline index is given (a single Redis)
    ARGV[2] max_pending     the most results that may wait for one join key's span (0: no limit)
    then, read by arg_reader:
      quota_sides, quota_bytes   the sides and bytes an ml_app may hold (0: no limit)
      quotas       a counted list of triples: ml_app (as in its keys' tag), its sides and bytes, for the
                   apps whose quota is not the default; sides -1: refuse (the caller knows it is used up)
    then per side:
      a span:    "s", identity ("trace_id:span_id"), body, deadline_ms, member
                 or, of an ml_app that joins by span tag, "S", the same, then joined_flag: how it is
                 stored when it takes no result but its key's ledger has entries (results delivered by
                 tag before it came): "1" (a run), "b" (an empty book: the key's next answer replaces it)
      a result:  "r", event_id, record, deadline_ms, member, eval_ids (a counted list),
                 slots ("" in a namespace with a run: then no repeated-key rule applies);
                 record "": not encoded yet (the caller expects it to join): if it would be stored, it
                 is "later" and nothing is changed, for the caller to put again with its record;
                 "t" and the same for a result of an ml_app that joins by span tag
      (member: the side's name in the deadline index)

  Output, one reply per side:
    a span:    {"stored" | "replaced" | "duplicate", {event_id, record, ...}: the results it takes}
               | {"conflict", "<identity>\n<body>" of the span already bound to the join key}
    a result:  {"joined", "<span identity>\n<span body>"} | {"buffered"} | {"waiting"} | {"duplicate"}
               | {"full"}: max_pending results already wait for this join key; not stored
               | {"tagged"} ("t" only): no span is here; not stored, the caller delivers it joined by tag
               | {"later"} (record ""): it would be stored; nothing changed
    either:    {"quota"}: it would wait without joining anything and its ml_app holds its quota; not stored

  A stored side is entered in the deadline index in the same call when the index key is given
  (GT: a redelivered side never pulls a deadline earlier; a republished one may push it later), with one
  ZADD per index shard once every side of the call is handled.
]]
local keys_per_side = tonumber(ARGV[1])
local max_pending = tonumber(ARGV[2])
--- @include "arg_reader"
local next_arg, next_list = arg_reader(3)
--- @include "book"
--- @include "usage"
local usage = KEYS[#KEYS]
local quota_sides = tonumber(next_arg())
local quota_bytes = tonumber(next_arg())
local quotas = {}
do
  local flat = next_list()
  for i = 1, #flat, 3 do quotas[flat[i]] = {tonumber(flat[i + 1]), tonumber(flat[i + 2])} end
end

-- Whether storing a side of `bytes` that joins nothing would take k's ml_app past its quota.
local function over_quota(k, bytes)
  local max_sides, max_bytes = quota_sides, quota_bytes
  local own = quotas[k.app]
  if own then max_sides, max_bytes = own[1], own[2] end
  if max_sides < 0 then return true end
  if max_sides == 0 and max_bytes == 0 then return false end
  local sides, size = used(usage, k.app)
  return (max_sides > 0 and sides + 1 > max_sides) or (max_bytes > 0 and size + bytes > max_bytes)
end

-- The call's deadline-index entries, per index shard, in the order the shards were first met: written with
-- one ZADD per shard at the end of the call (one per entry cost about twice as much: bench.redis_scripts).
-- ZADD takes its pairs in order, so a member given twice ends as two ZADDs one after the other would leave it.
local index_entries, index_keys = {}, {}
local INDEX_PAIRS_PER_CALL = 1000

local function index(k, deadline, member)
  if not k.index then return end
  local entries = index_entries[k.index]
  if not entries then
    entries = {}
    index_entries[k.index] = entries
    index_keys[#index_keys + 1] = k.index
  end
  entries[#entries + 1] = deadline
  entries[#entries + 1] = member
end

local function write_index()
  for _, key in ipairs(index_keys) do
    local entries = index_entries[key]
    for i = 1, #entries, 2 * INDEX_PAIRS_PER_CALL do
      redis.call('ZADD', key, 'GT', unpack(entries, i, math.min(i + 2 * INDEX_PAIRS_PER_CALL - 1, #entries)))
    end
  end
end

local function names(rest, identity)
  return string.sub(rest, 1, #identity + 1) == identity .. '\n'
end

-- The span the current one replaced: its book and "<identity>\n<body>", or nil.
local function replaced_span(k)
  local stored = redis.call('GET', k.replaced)
  if not stored then return nil, nil end
  local _, book, rest = parse_span(stored)
  return book, rest
end

-- The results waiting in the pending hash, each {event_id, slots (nil without), record}.
local function pending_results(k)
  local out = {}
  local flat = redis.call('HGETALL', k.pending)
  for i = 1, #flat, 2 do
    local slots, record = parse_pending(flat[i + 1])
    out[#out + 1] = {flat[i], slots, record}
  end
  return out
end

-- Pending results a span with this book took: with a book, the results in it; without one (a span
-- with a run, or stored before books), every result without slots, as before books.
local function taken_by(k, book, with_plain)
  local out = {}
  for _, p in ipairs(pending_results(k)) do
    local event_id, slots, record = p[1], p[2], p[3]
    if (slots and took(book, digest(event_id))) or (not slots and with_plain) then
      out[#out + 1] = event_id
      out[#out + 1] = record
    end
  end
  return out
end

-- Results with slots that wait for a span: in the pending hash, and in neither book.
local function waiting(k, book, old_book)
  local out = {}
  for _, p in ipairs(pending_results(k)) do
    if p[2] then
      local ev = digest(p[1])
      if not took(book, ev) and not took(old_book, ev) then out[#out + 1] = p end
    end
  end
  return out
end

-- What a span arriving takes of the waiting results: those whose slots no other waiting result
-- shares. Returns the flat list event_id, record, ... and the book entries.
local function take(candidates)
  local count = {}
  for _, c in ipairs(candidates) do
    for i = 1, #c[2], SLOT do
      local slot = string.sub(c[2], i, i + SLOT - 1)
      count[slot] = (count[slot] or 0) + 1
    end
  end
  local taken, book = {}, ''
  for _, c in ipairs(candidates) do
    local alone = true
    for i = 1, #c[2], SLOT do
      if count[string.sub(c[2], i, i + SLOT - 1)] > 1 then alone = false break end
    end
    if alone then
      book = book .. entries(c[2], digest(c[1]))
      taken[#taken + 1] = c[1]
      taken[#taken + 1] = c[3]
    end
  end
  return taken, book
end

local function stored_span(book, joined, identity, body)
  if book ~= '' then return 'b' .. book .. BOOK_END .. identity .. '\n' .. body end
  if joined then return '1' .. identity .. '\n' .. body end
  return '0' .. identity .. '\n' .. body
end

local function put_span(k, identity, body, deadline, member, joined_flag)
  local stored = redis.call('GET', k.span)
  if not stored then
    local expiring = redis.call('HGET', k.expiring, 's')
    if expiring and names(expiring, identity) then
      index(k, deadline, member)
      return {'duplicate', {}}
    end
    -- Results without slots are all taken, as before books; those with slots by the rule of take().
    local out, candidates = {}, {}
    for _, p in ipairs(pending_results(k)) do
      if p[2] then
        candidates[#candidates + 1] = p
      else
        out[#out + 1] = p[1]
        out[#out + 1] = p[3]
      end
    end
    local taken, book = take(candidates)
    for _, v in ipairs(taken) do out[#out + 1] = v end
    local value = stored_span(book, #out > 0, identity, body)
    if joined_flag and #out == 0 and redis.call('EXISTS', k.ledger) == 1 then
      -- Its results were delivered by tag before it came: joined, so that its deadline reports nothing.
      value = joined_flag == 'b' and ('b' .. BOOK_END .. identity .. '\n' .. body) or ('1' .. identity .. '\n' .. body)
    end
    if string.sub(value, 1, 1) == '0' and over_quota(k, #value) then return {'quota'} end
    local old_size = redis.call('STRLEN', k.replaced)  -- none is left without a span, but count it if one is
    if old_size > 0 then
      account(k.app, -1, -old_size)
      redis.call('DEL', k.replaced)
    end
    redis.call('SET', k.span, value)
    account(k.app, 1, #value)
    index(k, deadline, member)
    return {'stored', out}
  end
  local flag, book, rest = parse_span(stored)
  if names(rest, identity) then
    -- A redelivered span: the results it took may not have been delivered yet (a crash before the
    -- commit), so they are returned again; the delivery ledger keeps them from being sent twice.
    index(k, deadline, member)
    return {'duplicate', taken_by(k, book, true)}
  end
  local old_book, old_rest = replaced_span(k)
  if old_rest and names(old_rest, identity) then
    index(k, deadline, member)
    return {'duplicate', taken_by(k, old_book, false)}
  end
  if flag ~= 'b' or (old_book and #taken_by(k, old_book, false) > 0) then
    return {'conflict', rest}
  end
  local taken, new_book = take(waiting(k, book, ''))
  local value = stored_span(new_book, false, identity, body)
  if #taken == 0 and over_quota(k, #value) then return {'quota'} end
  -- The span moves to replaced (counted already), over the one replaced before, if any.
  local old_size = redis.call('STRLEN', k.replaced)
  account(k.app, old_size > 0 and 0 or 1, #value - old_size)
  redis.call('SET', k.replaced, stored)
  redis.call('SET', k.span, value)
  index(k, deadline, member)
  return {'replaced', taken}
end

local function settled(k, eval_ids)
  if #eval_ids == 0 then return false end
  for _, eval_id in ipairs(eval_ids) do
    local state = redis.call('HGET', k.ledger, eval_id)
    if not state or (state ~= 'd' and state ~= 'x') then return false end
  end
  return true
end

-- Buffer a result; "full" when max_pending results already wait for this join key.
local function buffer(k, event_id, value, deadline, member, status)
  -- A span releases all of its waiting results in one reply: their number is bounded, or one join key
  -- flooded with distinct results would grow without limit and then exhaust the consumer's memory.
  if max_pending > 0 and redis.call('HLEN', k.pending) >= max_pending then return {'full'} end
  if over_quota(k, #value) then return {'quota'} end
  redis.call('HSET', k.pending, event_id, value)
  account(k.app, 1, #value)
  index(k, deadline, member)
  return {status}
end

-- Waiting already (or being reported), or delivered (or dead-lettered) in full: nothing to do.
local function known(k, event_id, eval_ids)
  return redis.call('HEXISTS', k.pending, event_id) == 1
      or redis.call('HEXISTS', k.expiring, 'r:' .. event_id) == 1 or settled(k, eval_ids)
end

local function put_result(k, event_id, record, deadline, member, eval_ids, slots, by_tag)
  local stored = redis.call('GET', k.span)
  if stored then
    local flag, book, rest = parse_span(stored)
    if slots == '' or flag == '1' then  -- a run names the answer, or the span predates books
      if flag == '0' then redis.call('SETRANGE', k.span, 0, '1') end
      return {'joined', rest}
    end
    local ev = digest(event_id)
    if took(book, ev) then return {'joined', rest} end
    local old_book, old_rest = replaced_span(k)
    if old_book and took(old_book, ev) then return {'joined', old_rest} end
    if known(k, event_id, eval_ids) then
      index(k, deadline, member)
      return {'duplicate'}
    end
    local free = true
    for i = 1, #slots, SLOT do
      if holder(book, string.sub(slots, i, i + SLOT - 1)) then free = false break end
    end
    if free then
      for _, c in ipairs(waiting(k, book, old_book or '')) do
        for i = 1, #slots, SLOT do
          if shares(c[2], string.sub(slots, i, i + SLOT - 1)) then free = false break end
        end
        if not free then break end
      end
    end
    if free then
      local value = 'b' .. book .. entries(slots, ev) .. BOOK_END .. rest
      account(k.app, 0, #value - #stored)
      redis.call('SET', k.span, value)
      return {'joined', rest}
    end
    -- It repeats an evaluation of this answer (or of a result that waits): it is for the key's next answer.
    if record == '' then return {'later'} end
    return buffer(k, event_id, '\2' .. slots .. BOOK_END .. record, deadline, member, 'waiting')
  end
  if by_tag then
    -- Delivered joined by tag, never stored: the ledger keeps it from going twice.
    if redis.call('HEXISTS', k.expiring, 'r:' .. event_id) == 1 or settled(k, eval_ids) then return {'duplicate'} end
    return {'tagged'}
  end
  -- E.g. redelivered after its span expired.
  if known(k, event_id, eval_ids) then
    index(k, deadline, member)
    return {'duplicate'}
  end
  if record == '' then return {'later'} end
  if slots ~= '' then record = '\2' .. slots .. BOOK_END .. record end
  return buffer(k, event_id, record, deadline, member, 'buffered')
end

local out = {}
for base = 0, #KEYS - 2, keys_per_side do
  local k = {span = KEYS[base + 1], pending = KEYS[base + 2], expiring = KEYS[base + 3],
             replaced = KEYS[base + 4], ledger = KEYS[base + 5]}
  k.app = app_of(k.span)
  if keys_per_side == 6 then k.index = KEYS[base + 6] end
  -- One read per line: Lua does not promise the order in which a call's arguments are evaluated.
  local kind = next_arg()
  if kind == 's' or kind == 'S' then
    local identity = next_arg()
    local body = next_arg()
    local deadline = next_arg()
    local member = next_arg()
    local joined_flag = nil
    if kind == 'S' then joined_flag = next_arg() end
    out[#out + 1] = put_span(k, identity, body, deadline, member, joined_flag)
  else
    local event_id = next_arg()
    local record = next_arg()
    local deadline = next_arg()
    local member = next_arg()
    local eval_ids = next_list()
    local slots = next_arg()
    out[#out + 1] = put_result(k, event_id, record, deadline, member, eval_ids, slots, kind == 't')
  end
end
write_index()
flush(usage)
return out
