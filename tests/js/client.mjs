// A stock automerge-repo client, driven by shoal's tests over stdin/stdout.
//
//   node client.mjs WS_URL
//
// Connects a Repo (no storage: everything it knows comes from the node)
// with automerge-repo's own WebSocket client adapter to WS_URL, then reads
// one JSON command per line and answers one JSON line each:
//
//   {"op":"create","value":{...}}        -> {"url":"automerge:..."}
//   {"op":"find","url":U}                -> {"doc":{...}}
//   {"op":"change","url":U,"key":K,"value":V} -> {"doc":{...}}
//   {"op":"wait","url":U,"keys":{K:V,...},"ms":N}
//                                        -> {"doc":{...}} once every K is V
//   {"op":"broadcast","url":U,"message":M} -> {}  (an ephemeral message)
//   {"op":"ephemeral","url":U,"ms":N}    -> {"message":M} (the next one)
//
// Any failure answers {"error":"..."}.
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import readline from "node:readline";

const url = process.argv[2];
if (!url) {
  console.error("usage: node client.mjs WS_URL");
  process.exit(2);
}

const repo = new Repo({ network: [new WebSocketClientAdapter(url)] });
const handles = new Map();
const heard = [];

async function handle(u) {
  if (!handles.has(u)) {
    const h = await repo.find(u);
    h.on("ephemeral-message", (m) => heard.push({ url: u, message: m.message }));
    handles.set(u, h);
  }
  return handles.get(u);
}

function until(h, pred, ms) {
  return new Promise((resolve, reject) => {
    if (pred(h.doc())) return resolve(h.doc());
    const timer = setTimeout(() => {
      h.off("change", check);
      reject(new Error(`timed out after ${ms} ms; the document is ${JSON.stringify(h.doc())}`));
    }, ms);
    function check() {
      if (pred(h.doc())) {
        clearTimeout(timer);
        h.off("change", check);
        resolve(h.doc());
      }
    }
    h.on("change", check);
  });
}

async function run(cmd) {
  switch (cmd.op) {
    case "create": {
      const h = repo.create(cmd.value ?? {});
      handles.set(h.url, h);
      h.on("ephemeral-message", (m) => heard.push({ url: h.url, message: m.message }));
      return { url: h.url };
    }
    case "find":
      return { doc: (await handle(cmd.url)).doc() };
    case "change": {
      const h = await handle(cmd.url);
      h.change((d) => {
        d[cmd.key] = cmd.value;
      });
      return { doc: h.doc() };
    }
    case "wait": {
      const h = await handle(cmd.url);
      const want = Object.entries(cmd.keys);
      const doc = await until(
        h,
        (d) => want.every(([k, v]) => JSON.stringify(d?.[k]) === JSON.stringify(v)),
        cmd.ms ?? 10000,
      );
      return { doc };
    }
    case "broadcast":
      (await handle(cmd.url)).broadcast(cmd.message);
      return {};
    case "ephemeral": {
      await handle(cmd.url);
      const deadline = Date.now() + (cmd.ms ?? 10000);
      while (Date.now() < deadline) {
        const i = heard.findIndex((m) => m.url === cmd.url);
        if (i >= 0) return { message: heard.splice(i, 1)[0].message };
        await new Promise((r) => setTimeout(r, 20));
      }
      throw new Error("no ephemeral message arrived");
    }
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let out;
  try {
    out = await run(JSON.parse(line));
  } catch (e) {
    out = { error: String(e?.message ?? e) };
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}
process.exit(0);
