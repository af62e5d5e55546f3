"""Every Redis key asyncgrad uses, built here and nowhere else, and the scripts about names.

Each key carries the namespace and, for one agent's keys, a `{agent}` hash tag so that a
Redis Cluster keeps them in one slot (the scripts below touch one agent's keys only).
"""

from __future__ import annotations

import re

__all__ = [
    "GROUP",
    "HEARTBEATS",
    "LEAVE",
    "REGISTER",
    "SET_HEARTBEAT",
    "UNREGISTER",
    "WITHDRAW",
    "check_name",
    "dead_letters",
    "heartbeat",
    "inbox",
    "namespace_of",
    "registered",
    "registry",
    "seen",
]

GROUP = "asyncgrad"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


def check_name(kind: str, value: str) -> str:
    """Agent names and namespaces: letters, digits, `_ . -` (they are part of key names)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be 1-100 of the characters A-Z a-z 0-9 _ . -")
    return value


def inbox(namespace: str, agent: str) -> str:
    return f"{namespace}:{{{agent}}}:inbox"


def heartbeat(namespace: str, agent: str) -> str:
    return f"{namespace}:{{{agent}}}:alive"


def seen(namespace: str, agent: str) -> str:
    """Redis's clock (ms) at the agent's latest heartbeat: unlike the heartbeat, it outlives
    a crash (for a week), so `asyncgrad status` can tell since when the agent is gone."""
    return f"{namespace}:{{{agent}}}:seen"


def dead_letters(namespace: str, agent: str) -> str:
    return f"{namespace}:{{{agent}}}:dead"


def registry(namespace: str) -> str:
    """A hash: `n:NAME` -> id and `i:ID` -> name, for every agent started and not stopped
    cleanly (a crashed one stays, with its inbox, until an agent of that name starts and
    stops cleanly; `asyncgrad status` lists it as gone for a while, by its `seen` key)."""
    return f"{namespace}:registry"


def registered(flat: list[bytes]) -> dict[str, int]:
    """Name -> id, from `HGETALL` of a `registry` hash."""
    pairs = zip(flat[::2], flat[1::2], strict=True)
    return {k[2:].decode(): int(v) for k, v in pairs if k.startswith(b"n:")}


# Every live agent's heartbeat, in any namespace (a SCAN pattern).
HEARTBEATS = "*:{*}:alive"


def namespace_of(heartbeat_key: str) -> str:
    """The namespace of a key made by `heartbeat` (names and namespaces have no `{`)."""
    return heartbeat_key.partition(":{")[0]


# Gives `name` the id it had before, else ARGV[2] if that is free (the id it had before
# Redis lost the registry), else the smallest free one (ids stay below 2**16).
REGISTER = """
local id = redis.call('HGET', KEYS[1], 'n:' .. ARGV[1])
if id then return tonumber(id) end
local want = tonumber(ARGV[2])
if want >= 0 and want < 65536 and redis.call('HSETNX', KEYS[1], 'i:' .. want, ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'n:' .. ARGV[1], want)
  return want
end
for i = 0, 65535 do
  if redis.call('HSETNX', KEYS[1], 'i:' .. i, ARGV[1]) == 1 then
    redis.call('HSET', KEYS[1], 'n:' .. ARGV[1], i)
    return i
  end
end
return redis.error_reply('ERR no free agent id in this namespace')
"""
# Removes agent ARGV[1] (id ARGV[2]) from registry KEYS[1], unless the name has another id
# now; a clean stop runs it while it still holds its heartbeat (so the name is still its).
UNREGISTER = """
local id = redis.call('HGET', KEYS[1], 'n:' .. ARGV[1])
if id ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'n:' .. ARGV[1])
if redis.call('HGET', KEYS[1], 'i:' .. id) == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'i:' .. id)
end
return 1
"""
# Sets the heartbeat KEYS[1] if nobody holds it or its value starts with ARGV[1]: the
# run's own token (a refresh), or the whole value of a holder found gone (a takeover).
# The value ends with ` t=MS`, Redis's clock in ms, which it returns (0: not set); the
# `seen` key KEYS[2], if given, gets MS too.
SET_HEARTBEAT = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[2] .. ' t=' .. ms, 'PX', ARGV[3])
if KEYS[2] then redis.call('SET', KEYS[2], ms, 'EX', 604800) end
return ms
"""
# Withdraws a message entry ARGV[2] from inbox KEYS[1] if the group ARGV[1] has not read
# it yet: 1 (withdrawn, or gone: it will never be read), 0 (its receiver took it).
WITHDRAW = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return 1 end
local last
for _, group in ipairs(groups) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[1] then last = fields['last-delivered-id'] end
end
if not last then return 1 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local lms, lseq = parse(last)
local ems, eseq = parse(ARGV[2])
if ems < lms or (ems == lms and eseq <= lseq) then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""
# Leaving: unless another run (token ARGV[1]) holds the name now, its heartbeat KEYS[1]
# and `seen` key KEYS[3] go, and its inbox KEYS[2] too if nothing waits in it (so a late
# message is never lost silently).
LEAVE = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[3])
if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
return 1
"""
