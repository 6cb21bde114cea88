--[[
  Not a script: how a span's book and a pending result's slots are read (put_batch, expire_side),
  pasted in place of their include line when the store loads them (store_redis._script).

  Without a run, a span records which results it took, in its book: one entry per slot of each,
  <slot><result digest>, 8 + 8 hex characters (store.SLOT_CHARS; the digest is the start of
  SHA-1(event_id), store.result_digest). A pending result of such a namespace carries its slots.

    parse_span(stored)      flag ("0", "1" or "b"), book ("" without one), "<identity>\n<body>"
    parse_pending(value)    slots (nil for a record stored without), the record as the caller encoded it
    digest(event_id)        a result's name in a book
    took(book, ev)          whether the result named ev is in the book
    holder(book, slot)      the digest of the result that took slot, or nil
    shares(slots, slot)     whether a slot list holds slot
    entries(slots, ev)      the book entries of a result that takes its slots
]]
local SLOT = 8
local ENTRY = 2 * SLOT
local BOOK_END = '\30'

local function parse_span(stored)
  local flag = string.sub(stored, 1, 1)
  if flag ~= 'b' then return flag, '', string.sub(stored, 2) end
  local book_end = string.find(stored, BOOK_END, 2, true)
  return flag, string.sub(stored, 2, book_end - 1), string.sub(stored, book_end + 1)
end

local function parse_pending(value)
  if string.sub(value, 1, 1) ~= '\2' then return nil, value end
  local slots_end = string.find(value, BOOK_END, 2, true)
  return string.sub(value, 2, slots_end - 1), string.sub(value, slots_end + 1)
end

local function digest(event_id)
  return string.sub(redis.sha1hex(event_id), 1, SLOT)
end

local function took(book, ev)
  for i = 1, #book, ENTRY do
    if string.sub(book, i + SLOT, i + ENTRY - 1) == ev then return true end
  end
  return false
end

local function holder(book, slot)
  for i = 1, #book, ENTRY do
    if string.sub(book, i, i + SLOT - 1) == slot then return string.sub(book, i + SLOT, i + ENTRY - 1) end
  end
  return nil
end

local function shares(slots, slot)
  for i = 1, #slots, SLOT do
    if string.sub(slots, i, i + SLOT - 1) == slot then return true end
  end
  return false
end

local function entries(slots, ev)
  local out = {}
  for i = 1, #slots, SLOT do out[#out + 1] = string.sub(slots, i, i + SLOT - 1) .. ev end
  return table.concat(out)
end
