-- wrk script for bench/serving.py: POST /v1/classify, one sentence per request, cycling through a
-- file of JSON bodies (one per line, ASCII-only, written by bench/serving.py), and one JSON line
-- from done() for the parser, so nothing depends on wrk's human-readable summary.
--
--   wrk -t1 -c32 -d15s --latency --timeout 60s -H 'Content-Type: application/json' \
--       -s bench/wrk/classify.lua http://127.0.0.1:8000 -- bodies.jsonl

local threads = {}

-- Runs in the main Lua state once per thread, before init: give each thread its own start offset,
-- so two threads do not send the same sentence in lockstep.
function setup(thread)
   thread:set("offset", #threads * 97)
   table.insert(threads, thread)
end

local requests = {}
local counter = 0

-- Runs in each thread's own Lua state; args are what follows `--` on wrk's command line.
function init(args)
   local path = args[1] or error("usage: wrk ... -s classify.lua URL -- BODIES_FILE")
   for line in io.lines(path) do
      -- Formatted once here (wrk.headers already holds -H), so request() costs a table lookup.
      if #line > 0 then requests[#requests + 1] = wrk.format("POST", "/v1/classify", nil, line) end
   end
   if #requests == 0 then error("no request bodies in " .. path) end
   counter = (offset or 0) % #requests
   -- LuaJIT seeds every state alike: without this, each thread would draw the same think times.
   -- Fixed per thread, so the trees a run compares get the same sequence.
   math.randomseed(1 + (offset or 0))
end

-- WRK_THINK_MS (bench/serving.py --think-ms): each connection waits an exponential time of this mean
-- before each request, so arrivals depend little on answers (an open-loop-like load at a set rate).
-- wrk times requests through its timers only when delay() exists, so it is defined only then.
local think_ms = tonumber(os.getenv("WRK_THINK_MS") or "0")
if think_ms > 0 then
   function delay()
      return math.floor(-think_ms * math.log(1 - math.random()))
   end
end

function request()
   counter = counter % #requests + 1
   return requests[counter]
end

-- Latencies are in microseconds; errors.status counts responses with status > 399.
function done(summary, latency, _)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
