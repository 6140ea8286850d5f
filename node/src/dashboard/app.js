// shoal's dashboard: plain JavaScript, served by the node, no build step.
// Talks only to this origin: the node's /v1 API (with the session cookie)
// and its event stream.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);

// Builds an element; strings become text nodes (never HTML).
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  const v = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error((v && v.error) || `${r.status}`);
  return v;
}

const short = (id) => (id && id.length > 12 ? `${id.slice(0, 6)}…${id.slice(-4)}` : id);
const bytes = (n) =>
  n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB`
  : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB`
  : n >= 1 << 10 ? `${(n / (1 << 10)).toFixed(1)} KiB`
  : `${n} B`;

const names = new Map(); // device id -> name, from members lists
const invites = new Map(); // space id -> the last invite issued here (kept across redraws)
const historyPaths = new Map(); // space id -> the path whose history is shown
let spaceNames = new Map(); // space id -> name

function activity(text) {
  const list = $("#activity");
  list.prepend(el("li", {}, `${new Date().toLocaleTimeString()} ${text}`));
  while (list.children.length > 50) list.lastChild.remove();
}

// ----- views --------------------------------------------------------------

async function renderDevice() {
  const id = await api("GET", "/v1/id");
  $("#device").textContent = `${id.name} · ${id.device_id}`;
  names.set(id.device_id, id.name);
}

async function renderPeers() {
  const peers = await api("GET", "/v1/peers");
  const body = $("#peers tbody");
  body.replaceChildren(
    ...peers.map((p) =>
      el("tr", { "data-peer": p.peer },
        el("td", {}, names.get(p.peer) || short(p.peer)),
        el("td", {}, p.relayed ? "relayed" : "direct"),
        el("td", {}, p.rtt_ms == null ? "–" : `${p.rtt_ms.toFixed(1)} ms`))),
  );
  if (!peers.length) body.append(el("tr", {}, el("td", { colspan: 3, class: "muted" }, "no peers connected")));
}

function folderView(f) {
  if (!f) return el("p", { class: "folder muted" }, "no folder on this device");
  const eta = f.eta_secs == null ? "" : `, ${f.eta_secs} s left`;
  return el("p", { class: "folder" },
    el("span", { class: "path" }, f.path), " ",
    el("progress", { class: "progress", max: 100, value: f.progress }),
    el("span", { class: "state" }, f.state),
    el("span", { class: "detail muted" },
      ` ${f.files} files at the last scan · ${f.files_left} waiting · ${bytes(f.bytes_left)} to fetch${eta}`),
    f.problems.length ? el("span", { class: "error" }, ` ${f.problems.join("; ")}`) : null);
}

function inviteOut(inv) {
  return [
    el("div", { class: "invite-code" }, inv.code),
    el("img", { class: "invite-qr", alt: "invite QR code",
      src: `/ui/qr.svg?text=${encodeURIComponent(inv.code)}` }),
    el("div", { class: "muted" },
      `${inv.role}, one use, expires ${new Date(inv.expires_at * 1000).toLocaleString()}`),
  ];
}

function inviteView(space) {
  const role = el("select", { class: "invite-role" },
    el("option", { value: "editor" }, "editor"),
    el("option", { value: "viewer" }, "viewer"),
    el("option", { value: "owner" }, "owner"));
  const last = invites.get(space.id);
  const out = el("div", { class: "invite-out" }, last ? inviteOut(last) : []);
  const button = el("button", {
    class: "invite-btn", type: "button",
    onclick: async () => {
      out.replaceChildren("…");
      try {
        const inv = await api("POST", `/v1/spaces/${space.id}/invites`, { role: role.value });
        invites.set(space.id, inv);
        // the card may have been redrawn while we waited
        const now = document.querySelector(`section.space[data-id="${space.id}"] .invite-out`);
        (now || out).replaceChildren(...inviteOut(inv));
      } catch (e) {
        out.replaceChildren(el("span", { class: "error" }, String(e.message)));
      }
    },
  }, "Invite a device");
  return el("div", { class: "invite" }, role, " ", button, out);
}

// A file's versions, each with a button that restores it.
function historyView(space, writer) {
  const path = el("input", { class: "history-path", placeholder: "path in the folder", size: 28 });
  const out = el("div", { class: "history-out" });
  const show = async () => {
    historyPaths.set(space.id, path.value.trim());
    out.replaceChildren("…");
    try {
      const versions = await api("GET",
        `/v1/spaces/${space.id}/history?path=${encodeURIComponent(path.value.trim())}`);
      out.replaceChildren(versions.length
        ? el("ol", { class: "versions" }, versions.map((v) =>
          el("li", { "data-version": v.version },
            `${v.time} · ${names.get(v.device) || short(v.device)} · `,
            v.deleted ? "deleted" : `${bytes(v.size)} · ${v.content}`,
            v.current ? " (current)" : " ",
            writer && !v.current && !v.deleted && v.content !== "gone"
              ? el("button", {
                class: "restore-version-btn", type: "button",
                onclick: async (ev) => {
                  ev.target.disabled = true;
                  try {
                    await api("POST", `/v1/spaces/${space.id}/restore`,
                      { path: path.value.trim(), version: v.version });
                    activity(`restored version ${v.version} of ${path.value.trim()}`);
                    show();
                  } catch (e) {
                    activity(`restore failed: ${e.message}`);
                  }
                },
              }, "Restore this version")
              : null)))
        : el("p", { class: "muted" }, "no versions"));
    } catch (e) {
      out.replaceChildren(el("span", { class: "error" }, e.message));
    }
  };
  const last = historyPaths.get(space.id);
  if (last) {
    path.value = last;
    show();
  }
  return el("div", { class: "history" }, path, " ",
    el("button", { class: "history-btn", type: "button", onclick: show }, "Show history"), out);
}

// An owner's controls for another member: its role, or revoking it.
function memberControls(space, m) {
  const role = el("select", { class: "member-role" },
    ["owner", "editor", "viewer"].map((r) =>
      el("option", r === m.role ? { value: r, selected: "" } : { value: r }, r)));
  role.addEventListener("change", async () => {
    try {
      await api("PUT", `/v1/spaces/${space.id}/members/${m.device}`, { role: role.value });
      activity(`${m.name} is now ${role.value} in ${space.name}`);
      refreshSoon();
    } catch (e) {
      activity(`role change failed: ${e.message}`);
    }
  });
  const revoke = el("button", {
    class: "revoke-btn", type: "button",
    onclick: async () => {
      if (!window.confirm(`Remove ${m.name} from ${space.name}? The space key rotates.`)) return;
      try {
        await api("DELETE", `/v1/spaces/${space.id}/members/${m.device}`);
        activity(`${m.name} removed from ${space.name}`);
        refreshSoon();
      } catch (e) {
        activity(`revocation failed: ${e.message}`);
      }
    },
  }, "Revoke");
  return [role, " ", revoke];
}

async function spaceView(space, status) {
  const [members, conflicts, trash] = await Promise.all([
    api("GET", `/v1/spaces/${space.id}/members`),
    status && status.folder ? api("GET", `/v1/spaces/${space.id}/conflicts`) : [],
    status && status.folder ? api("GET", `/v1/spaces/${space.id}/trash`) : [],
  ]);
  for (const m of members) names.set(m.device, m.name);
  const owner = space.role === "owner";
  const writer = owner || space.role === "editor";
  return el("section", { class: "space", "data-name": space.name, "data-id": space.id },
    el("h3", {}, space.name),
    el("div", { class: "meta" }, `${space.role} · ${short(space.id)} · key epoch ${space.epoch} · ${space.docs.length} documents`),
    folderView(status && status.folder),
    el("h4", {}, "Members"),
    el("table", { class: "members" },
      el("tbody", {}, members.map((m) =>
        el("tr", { "data-device": m.device },
          el("td", {}, m.name, m.this_device ? " (this device)" : ""),
          el("td", {}, owner && !m.this_device ? memberControls(space, m) : m.role),
          el("td", {}, m.this_device ? "" : m.connected ? "connected"
            : m.last_seen ? `last seen ${new Date(m.last_seen * 1000).toLocaleString()}` : "not seen"))))),
    owner ? inviteView(space) : null,
    el("h4", {}, "Conflicts"),
    conflicts.length
      ? el("ul", { class: "conflicts" }, conflicts.map((c) =>
        el("li", {}, `${c.original}: ${names.get(c.device) || short(c.device)}'s version kept as ${c.copy}`)))
      : el("p", { class: "conflicts muted" }, "none"),
    el("h4", {}, "Deleted files"),
    trash.length
      ? el("ul", { class: "trash" }, trash.map((t) =>
        el("li", {}, `${t.path} (${bytes(t.size)}, by ${names.get(t.device) || short(t.device)}, ${t.time}) `,
          writer ? el("button", {
            class: "restore-btn", type: "button",
            onclick: async (ev) => {
              ev.target.disabled = true;
              try {
                await api("POST", `/v1/spaces/${space.id}/restore`, { path: t.path });
                activity(`restored ${t.path}`);
                refreshSoon();
              } catch (e) {
                activity(`restore of ${t.path} failed: ${e.message}`);
              }
            },
          }, "Restore") : null)))
      : el("p", { class: "trash muted" }, "none"),
    status && status.folder ? el("h4", {}, "File history") : null,
    status && status.folder ? historyView(space, writer) : null,
    el("h4", {}, "Documents"),
    el("p", { class: "docs muted" }, space.docs.length ? space.docs.join(", ") : "none"));
}

async function renderSpaces() {
  const [spaces, status] = await Promise.all([api("GET", "/v1/spaces"), api("GET", "/v1/status")]);
  spaceNames = new Map(spaces.map((s) => [s.id, s.name]));
  const byId = new Map(status.spaces.map((s) => [s.id, s]));
  const views = await Promise.all(spaces.map((s) => spaceView(s, byId.get(s.id))));
  $("#spaces").replaceChildren(...views);
  if (!spaces.length) $("#spaces").append(el("p", { class: "muted" }, "no spaces yet"));
}

async function refresh() {
  try {
    await renderSpaces();
    await renderPeers();
  } catch (e) {
    activity(`refresh failed: ${e.message}`);
  }
}

let timer = null;
function refreshSoon() {
  clearTimeout(timer);
  timer = setTimeout(refresh, 250);
}

// ----- live events ----------------------------------------------------------

function onEvent(ev) {
  const space = spaceNames.get(ev.space) || short(ev.space);
  switch (ev.type) {
    case "sync_progress": {
      const card = document.querySelector(`section.space[data-id="${ev.space}"]`);
      const bar = card && $(".progress", card);
      if (bar) {
        bar.value = ev.progress;
        $(".state", card).textContent = ev.state;
        const eta = ev.eta_secs == null ? "" : `, ${ev.eta_secs} s left`;
        $(".detail", card).textContent =
          ` ${ev.files_left} waiting · ${bytes(ev.bytes_left)} to fetch · ${bytes(ev.rate)}/s${eta}`;
      }
      if (ev.state === "in sync") refreshSoon();
      return;
    }
    case "transfer_started":
      activity(`${space}: fetching ${ev.path} (${bytes(ev.bytes)})`);
      return;
    case "transfer_finished":
      activity(`${space}: received ${ev.path} (${bytes(ev.bytes)}) in ${ev.millis} ms`);
      refreshSoon();
      return;
    case "file_changed":
      activity(`${space}: ${ev.deleted ? "deleted" : "changed"} ${ev.path} (${ev.origin})`);
      refreshSoon();
      return;
    case "conflict":
      activity(`${space}: conflict on ${ev.path}, copy ${ev.copy}`);
      refreshSoon();
      return;
    case "peer_connected":
    case "peer_disconnected":
    case "member_verified":
      refreshSoon();
      return;
    case "doc_changed":
      if (ev.doc === "members") refreshSoon();
      return;
    case "app_refused":
      activity(`${space}: an app's change to ${ev.doc} was refused: ${ev.reason}`);
      return;
    case "folder_error":
      activity(`${space}: ${ev.path || ""} ${ev.error || ""}`);
      return;
    case "lagged":
      refreshSoon();
      return;
    default:
      return;
  }
}

function listen() {
  const live = $("#live");
  const es = new EventSource("/v1/events");
  es.onopen = () => {
    live.className = "on";
    live.textContent = "live";
    refreshSoon();
  };
  es.onerror = () => {
    live.className = "off";
    live.textContent = "reconnecting";
  };
  es.onmessage = (m) => {
    try {
      onEvent(JSON.parse(m.data));
    } catch (e) {
      // a malformed event is skipped
    }
  };
}

// ----- start -----------------------------------------------------------------

$("#create-space").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("#space-name").value.trim();
  $("#create-error").textContent = "";
  try {
    await api("POST", "/v1/spaces", { name });
    $("#space-name").value = "";
    activity(`created space ${name}`);
    await refresh();
  } catch (e) {
    $("#create-error").textContent = e.message;
  }
});

renderDevice().catch((e) => activity(`cannot read this device: ${e.message}`));
refresh();
listen();
