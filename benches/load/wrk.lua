-- wrk script shared by every HTTP/1.1 row of benches/load/run.sh. Configured through the
-- environment so one file serves all workloads:
--
--   BENCH_METHOD   request method (default GET)
--   BENCH_BODY     request body; "{id}" is replaced by the client id when BENCH_UNIQUE=1
--   BENCH_CTYPE    Content-Type for the body (default application/x-www-form-urlencoded)
--   BENCH_UNIQUE   1: a new client id per request
--   BENCH_PATH     with BENCH_UNIQUE: path and query to send, "{id}" replaced by the id
--                  (default: the URL's path)
--   BENCH_PREFIX   prefix of generated ids; run.sh makes it unique per run and round, so a
--                  later round never hits what an earlier one cached
--   BENCH_LIMIT    with BENCH_UNIQUE: ids cycle through this many values, and the thread
--                  stops after this many responses (the 100k-decisions memory fill)
--
-- done() prints one machine-readable line that run.sh parses:
--   BENCH requests=N duration_us=N p50_us=N p99_us=N errors=N non2xx=N

local method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY")
local unique = os.getenv("BENCH_UNIQUE") == "1"
local prefix = os.getenv("BENCH_PREFIX") or "bench-"
local limit = tonumber(os.getenv("BENCH_LIMIT") or "0")

wrk.method = method
if body and body ~= "" then
   wrk.body = body
   wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE") or "application/x-www-form-urlencoded"
end

local threads = {}
local next_thread = 0

function setup(thread)
   -- Each wrk thread runs its own Lua state; give each a distinct slice of the id space.
   thread:set("tid", next_thread)
   next_thread = next_thread + 1
   table.insert(threads, thread)
end

if unique then
   local counter = 0
   local responses = 0
   local path_template = os.getenv("BENCH_PATH")

   function init(args)
      path_template = path_template or wrk.path
   end

   -- Defining request() makes wrk call it for every request (the static rows don't, so
   -- wrk sends one pre-built request there and the load generator stays cheap).
   function request()
      local n = counter
      counter = counter + 1
      if limit > 0 then
         n = n % limit
      end
      local id = prefix .. tid .. "-" .. n
      local path = string.gsub(path_template, "{id}", id)
      local b = nil
      if body and body ~= "" then
         b = string.gsub(body, "{id}", id)
      end
      return wrk.format(nil, path, nil, b)
   end

   if limit > 0 then
      function response(status, headers, resp_body)
         responses = responses + 1
         if responses >= limit then
            wrk.thread:stop()
         end
      end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local errors = e.connect + e.read + e.write + e.timeout
   io.write(string.format(
      "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
      summary.requests, summary.duration,
      latency:percentile(50), latency:percentile(99), errors, e.status))
end
