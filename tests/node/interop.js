// A Node.js process sharing the cache through `shmcache serve` (ioredis).
// Usage: node interop.js PORT; reads what Python stored, writes its own keys,
// prints one JSON object with what it saw. Driven by tests/test_server_node.py.
"use strict";
const Redis = require("ioredis");

async function main() {
  const port = Number(process.argv[2]);
  const r = new Redis({ port, host: "127.0.0.1", maxRetriesPerRequest: 0, lazyConnect: true });
  await r.connect();
  const out = {};
  out.str = await r.get("py:str");
  out.int = await r.get("py:int");
  out.float = await r.get("py:float");
  out.ttl = await r.ttl("py:ttl");
  out.incr = await r.incr("py:int");
  try {
    await r.get("py:pickled");
    out.pickled = "no error";
  } catch (e) {
    out.pickled = e.message;
  }
  await r.set("node:str", "from node ✓", "EX", 120);
  await r.set("node:bin", Buffer.from([0, 1, 2, 255]));
  await r.incrby("node:counter", 7);
  const results = await r.multi().incr("node:tx").incr("node:tx").get("node:tx").exec();
  out.tx = results.map(([err, v]) => (err ? String(err) : v));
  const pipe = r.pipeline();
  for (let i = 0; i < 100; i++) pipe.set(`node:p${i}`, String(i));
  await pipe.exec();
  out.keys = (await r.keys("node:p*")).length;
  out.type = await r.type("py:pickled");
  await r.quit();
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack || e) + "\n");
  process.exit(1);
});
