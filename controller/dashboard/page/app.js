// The fleet dashboard: a snapshot from /api/fleet kept current by the
// Server-Sent Events of /api/events. Everything that comes from the fleet
// (node ids, labels, comments, NACK reasons) is put into the page as text,
// never as markup.

const MAX_EVENTS = 500;
const SHOWN_EVENTS = 200;
const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 5000;
// Rows drawn until asked for all: the worst nodes come first, the headline
// counts the whole fleet, and the filter finds any node.
const ROW_LIMIT = 500;

const state = {
  nodes: new Map(), // id -> node, as /api/fleet gives it
  versions: [], // newest first
  events: [], // newest first
  lastEventId: null,
  session: { operator: null, sign_in: false, may_read: true },
  sort: { key: "state", descending: true },
  rowLimit: ROW_LIMIT,
  source: null,
  reconnectDelay: RECONNECT_MIN_MS,
};

const $ = (id) => document.getElementById(id);

// --- DOM helpers: text only -------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const name in attributes) {
    const value = attributes[name];
    if (name === "class") node.className = value;
    else if (name === "title") node.title = value;
    else node.setAttribute(`data-${name}`, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// --- What a node's row says --------------------------------------------------

const STATE_RANK = { nack: 4, disconnected: 3, degraded: 2, updating: 1, ok: 0 };

function nodeState(node) {
  if (!node.connected) return "disconnected";
  if (node.last_nack) return "nack";
  if (node.desired_version > node.version) return "updating";
  if (node.servers_down > 0) return "degraded";
  return "ok";
}

function labelsText(labels) {
  return Object.entries(labels || {})
    .map(([k, v]) => `${k}=${v}`)
    .join(" ");
}

// "api: 10.0.0.7:8080, 10.0.0.8:8080" for the upstream with most servers
// down first.
function downText(down) {
  const byUpstream = new Map();
  for (const entry of down || []) {
    const slash = entry.indexOf("/");
    const upstream = slash < 0 ? entry : entry.slice(0, slash);
    const server = slash < 0 ? "" : entry.slice(slash + 1);
    if (!byUpstream.has(upstream)) byUpstream.set(upstream, []);
    byUpstream.get(upstream).push(server);
  }
  return [...byUpstream.entries()]
    .sort((a, b) => b[1].length - a[1].length || a[0].localeCompare(b[0]))
    .map(([upstream, servers]) => `${upstream}: ${servers.join(", ")} down`)
    .join("; ");
}

function matchesFilter(node, filter) {
  for (const word of filter.split(/\s+/).filter(Boolean)) {
    const eq = word.indexOf("=");
    if (eq > 0) {
      const [key, value] = [word.slice(0, eq), word.slice(eq + 1)];
      if ((node.labels || {})[key] !== value) return false;
    } else if (!node.id.includes(word) && nodeState(node) !== word) {
      return false;
    }
  }
  return true;
}

const SORT_KEYS = {
  id: (n) => n.id,
  labels: (n) => labelsText(n.labels),
  state: (n) => STATE_RANK[nodeState(n)],
  version: (n) => n.version,
  health: (n) => n.servers_down,
  nack: (n) => (n.last_nack ? n.last_nack.reason : ""),
};

function sortedNodes(nodes) {
  const key = SORT_KEYS[state.sort.key] || SORT_KEYS.id;
  const direction = state.sort.descending ? -1 : 1;
  // Each key computed once, not once per comparison.
  return nodes
    .map((node) => ({ node, key: key(node) }))
    .sort((a, b) => {
      const order = a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
      return order * direction || (a.node.id < b.node.id ? -1 : a.node.id > b.node.id ? 1 : 0);
    })
    .map((entry) => entry.node);
}

// --- Rendering ---------------------------------------------------------------

let renderPending = false;
let renders = 0;

// At most one render per frame, however many events arrive.
function render() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    const started = performance.now();
    renderHeadline();
    renderNodes();
    renderVersions();
    renderEvents();
    // A User Timing entry per render, for DevTools and bench/dashboard.sh;
    // the oldest are dropped so a page left open for days stays small.
    performance.measure("render", { start: started });
    if (++renders % 1000 === 0) performance.clearMeasures("render");
    document.body.dataset.rows = String($("nodes").tBodies[0].rows.length);
  });
}

function renderHeadline() {
  const nodes = [...state.nodes.values()];
  const latest = state.versions[0];
  const parts = [];
  if (latest) {
    const targets = nodes.filter((n) => n.desired_version === latest.version);
    const running = targets.filter((n) => n.connected && n.version === latest.version);
    parts.push(`v${latest.version} on ${running.length} of ${targets.length} nodes`);
  } else {
    parts.push(`no version published · ${nodes.length} nodes`);
  }
  const rolling = state.versions.find((v) => v.rollout && ["running", "paused"].includes(v.rollout.state));
  if (rolling) parts.push(`rollout of v${rolling.version}: ${rolloutText(rolling.rollout)}`);
  const nacks = nodes.filter((n) => n.last_nack).length;
  const disconnected = nodes.filter((n) => !n.connected).length;
  const degraded = nodes.filter((n) => n.connected && n.servers_down > 0).length;
  if (nacks) parts.push(`${nacks} NACK`);
  if (disconnected) parts.push(`${disconnected} disconnected`);
  if (degraded) parts.push(`${degraded} with upstreams down`);
  const headline = $("headline");
  headline.textContent = parts.join(" · ");
  headline.className = "headline " + (nacks || disconnected ? "bad" : degraded ? "warn" : "good");
}

// Rows are kept per node and rebuilt only when what they show changed:
// with thousands of nodes, an ACK costs one row, not the table.
const rowCache = new Map(); // id -> { key, tr }
let shownOrder = [];

function nodeRow(node) {
  const status = nodeState(node);
  const versionText =
    node.desired_version && node.desired_version !== node.version
      ? `v${node.version} → v${node.desired_version}`
      : `v${node.version}`;
  const total = node.servers_up + node.servers_down;
  const health = total ? `${node.servers_up}/${total} up` : "–";
  const stateText = node.connected
    ? status
    : `disconnected${node.last_seen ? ", last seen " + node.last_seen : ""}`;
  const labels = labelsText(node.labels);
  const down = downText(node.down);
  const nackLines = [];
  if (node.last_nack) {
    nackLines.push(["nack-reason", `v${node.last_nack.version}: ${node.last_nack.reason}`]);
    for (const error of node.last_nack.errors || []) {
      const where = error.path ? `${error.path}: ` : "";
      nackLines.push(["nack-error", `${where}${error.message}`]);
    }
  }
  const key = JSON.stringify([status, versionText, stateText, labels, health, down, nackLines]);
  const cached = rowCache.get(node.id);
  if (cached && cached.key === key) return cached.tr;
  const nack = el("td", { class: "nack" });
  for (const [kind, text] of nackLines) nack.append(el("div", { class: kind }, text));
  const tr = el(
    "tr",
    { class: `node ${status}`, node: node.id, state: status },
    el("td", { class: "id" }, node.id),
    el("td", { class: "labels" }, labels),
    el("td", { class: "state" }, stateText),
    el("td", { class: "version" }, versionText),
    el("td", { class: "health", title: down }, health, node.servers_down ? el("div", { class: "down" }, down) : null),
    nack,
  );
  rowCache.set(node.id, { key, tr });
  return tr;
}

function renderNodes() {
  const filter = $("node-filter").value.trim();
  const all = [...state.nodes.values()];
  const shown = sortedNodes(all.filter((n) => matchesFilter(n, filter)));
  $("node-count").textContent =
    shown.length === all.length ? `(${all.length})` : `(${shown.length} of ${all.length})`;
  for (const id of rowCache.keys()) if (!state.nodes.has(id)) rowCache.delete(id);
  const body = $("nodes").tBodies[0];
  const visible = shown.slice(0, state.rowLimit);
  const rows = visible.map(nodeRow);
  const order = visible.map((n) => n.id);
  const sameOrder = order.length === shownOrder.length && order.every((id, i) => id === shownOrder[i]);
  if (sameOrder) {
    // Same rows in the same places: swap only those rebuilt.
    // (An array, not body.rows: a live collection walks from the start
    // again after every change.)
    const current = Array.from(body.children);
    rows.forEach((tr, i) => {
      if (current[i] !== tr) current[i].replaceWith(tr);
    });
  } else {
    const fragment = document.createDocumentFragment();
    for (const tr of rows) fragment.append(tr);
    body.replaceChildren(fragment);
    shownOrder = order;
  }
  const more = shown.length - visible.length;
  $("more").hidden = more === 0;
  $("more-text").textContent = `${visible.length} of ${shown.length} nodes shown, worst first; ${more} more.`;
  document.body.dataset.matched = String(shown.length);
  for (const th of $("nodes").tHead.rows[0].cells) {
    th.className =
      th.dataset.sort === state.sort.key ? (state.sort.descending ? "sorted desc" : "sorted asc") : "";
  }
}

// "wave 2 of 3 · 1/1, 2/2, 0/7 running · baking" or "failed: the reason".
function rolloutText(rollout) {
  if (rollout.state !== "running" && rollout.state !== "paused") {
    return rollout.reason ? `${rollout.state}: ${rollout.reason}` : rollout.state;
  }
  const waves = rollout.wave_nodes.map((nodes, i) => `${rollout.wave_running[i]}/${nodes}`);
  const baking = rollout.state === "paused" ? " · paused" : rollout.baking_since ? " · baking" : "";
  return `wave ${rollout.released} of ${rollout.waves} · ${waves.join(", ")} running${baking}`;
}

function renderVersions() {
  const runningOn = new Map();
  for (const node of state.nodes.values()) {
    if (node.connected) runningOn.set(node.version, (runningOn.get(node.version) || 0) + 1);
  }
  const body = document.createElement("tbody");
  const latest = state.versions[0] ? state.versions[0].version : 0;
  for (const version of state.versions) {
    let action = null;
    const rolloutState = version.rollout ? version.rollout.state : "";
    const controls = { running: ["pause", "promote", "abort"], paused: ["resume", "abort"] }[rolloutState];
    if (state.session.operator && controls) {
      action = el("span", { class: "controls" });
      for (const name of controls) {
        const button = el("button", { class: name, version: String(version.version) }, name[0].toUpperCase() + name.slice(1));
        button.type = "button";
        button.addEventListener("click", () => controlRollout(version.version, name));
        action.append(button);
      }
    } else if (state.session.operator && version.version !== latest) {
      action = el("button", { class: "rollback", version: String(version.version) }, `Roll back to v${version.version}`);
      action.type = "button";
      action.addEventListener("click", () => rollback(version.version));
    }
    const rollout = version.rollout
      ? el("td", { class: `rollout ${version.rollout.state}` }, rolloutText(version.rollout))
      : el("td", { class: "rollout" }, "all at once");
    const comment = version.rollback_of && !version.comment
      ? `rollback to v${version.rollback_of}`
      : version.comment;
    body.append(
      el(
        "tr",
        { version: String(version.version) },
        el("td", {}, `v${version.version}`),
        el("td", { class: "running" }, String(runningOn.get(version.version) || 0)),
        rollout,
        el("td", {}, version.published_at),
        el("td", { class: "author" }, version.author),
        el("td", { class: "comment" }, comment),
        el("td", {}, version.selector || "all"),
        el("td", {}, action),
      ),
    );
  }
  $("versions").tBodies[0].replaceWith(body);
}

function eventText(event) {
  const d = event.detail || {};
  switch (event.event) {
    case "connected":
      return `connected with v${d.version} from ${d.address}`;
    case "disconnected":
      return `disconnected: ${d.reason}`;
    case "published":
      return `v${d.version} published by ${d.author || "?"}${d.comment ? ": " + d.comment : ""}`;
    case "ack":
      return `ACK v${d.version} (generation ${d.generation})`;
    case "nack":
      return `NACK v${d.version}: ${d.reason}`;
    case "health":
      return `${d.upstream}/${d.server} ${d.from} → ${d.to}${d.reason ? ": " + d.reason : ""}`;
    case "events_missed":
      return `${d.count} events missed`;
    case "rollout":
      return `v${d.version} rollout ${d.status.state}: ${rolloutText(d.status)}`;
    default:
      return event.event;
  }
}

function renderEvents() {
  const filter = $("event-filter").value.trim().toLowerCase();
  const list = document.createElement("ol");
  list.id = "events";
  let shown = 0;
  for (const event of state.events) {
    const text = eventText(event);
    if (filter && !`${event.event} ${event.node} ${text}`.toLowerCase().includes(filter)) continue;
    list.append(
      el(
        "li",
        { class: `event ${event.event}`, kind: event.event },
        el("time", {}, event.at),
        el("span", { class: "node" }, event.node || "controller"),
        el("span", { class: "kind" }, event.event),
        el("span", { class: "text" }, text),
      ),
    );
    if (++shown === SHOWN_EVENTS) break;
  }
  $("events").replaceWith(list);
}

// --- Data ----------------------------------------------------------------------

async function loadSnapshot() {
  const response = await fetch("/api/fleet", { cache: "no-store" });
  if (response.status === 401) {
    state.session.may_read = false;
    renderAccount();
    throw new Error("sign in to see the fleet");
  }
  if (!response.ok) throw new Error(`snapshot: HTTP ${response.status}`);
  const snapshot = await response.json();
  state.nodes = new Map(snapshot.nodes.map((n) => [n.id, n]));
  state.versions = snapshot.versions;
  // Events that came in while the snapshot was on its way may be missing
  // from it: apply them again, oldest first.
  const [run, through] = splitId(snapshot.events_through);
  for (const event of [...state.events].reverse()) {
    const [eventRun, number] = splitId(event.id);
    if (eventRun === run && number > through) applyToState(event, false);
  }
  render();
}

// "RUN-N" → ["RUN", N]
function splitId(id) {
  const dash = (id || "").lastIndexOf("-");
  return dash < 0 ? ["", 0] : [id.slice(0, dash), Number(id.slice(dash + 1))];
}

let snapshotTimer = null;

// Several reasons to read the snapshot again in a burst cost one read.
function refreshSoon() {
  if (snapshotTimer) return;
  snapshotTimer = setTimeout(() => {
    snapshotTimer = null;
    loadSnapshot().catch(() => {});
  }, 300);
}

function applyEvent(event) {
  applyToState(event, true);
  state.events.unshift(event);
  if (state.events.length > MAX_EVENTS) state.events.length = MAX_EVENTS;
  render();
}

// Each event sets a state (connected, the version run, the last NACK, a
// server's health), so applying one twice is applying it once. `live`:
// an event as it arrives, which may ask for a new snapshot.
function applyToState(event, live) {
  const node = state.nodes.get(event.node);
  const d = event.detail || {};
  switch (event.event) {
    case "connected":
      if (!node) {
        if (live) refreshSoon();
        break;
      }
      node.connected = true;
      node.labels = d.labels;
      node.version = d.version;
      node.address = d.address;
      break;
    case "disconnected":
      if (node) {
        node.connected = false;
        node.last_seen = event.at;
      }
      break;
    case "ack":
      if (node) {
        node.version = d.version;
        node.generation = d.generation;
        if (node.last_nack && node.last_nack.version <= d.version) node.last_nack = null;
      }
      break;
    case "nack":
      if (node) node.last_nack = { version: d.version, reason: d.reason, errors: d.errors, at: event.at };
      break;
    case "health":
      if (node) applyHealth(node, d);
      break;
    default:
      // A publish changes what many nodes want: read it whole.
      if (live) refreshSoon();
  }
}

// The node's sets of servers up and down, so that a transition applied
// twice (once in a snapshot, once as an event) counts once.
function applyHealth(node, transition) {
  const key = `${transition.upstream}/${transition.server}`;
  const up = new Set(node.up || []);
  const down = new Set(node.down || []);
  up.delete(key);
  down.delete(key);
  if (transition.to === "healthy") up.add(key);
  if (transition.to === "unhealthy") down.add(key);
  node.up = [...up].sort();
  node.down = [...down].sort();
  node.servers_up = node.up.length;
  node.servers_down = node.down.length;
}

function setLink(text, className) {
  const link = $("link");
  link.textContent = text;
  link.className = `link ${className}`;
}

// Live events. On any error the page reconnects by itself, with the id of
// the last event it saw, and says so meanwhile.
function connect() {
  const query = state.lastEventId ? `?last_event_id=${encodeURIComponent(state.lastEventId)}` : "";
  const source = new EventSource(`/api/events${query}`);
  state.source = source;
  source.onopen = () => {
    state.reconnectDelay = RECONNECT_MIN_MS;
    setLink("live", "live");
  };
  source.onmessage = (message) => {
    state.lastEventId = message.lastEventId || state.lastEventId;
    const event = JSON.parse(message.data);
    event.id = message.lastEventId;
    applyEvent(event);
  };
  source.addEventListener("reset", () => {
    // What was missed is gone (the controller restarted, or the page was
    // away too long): start over from the snapshot.
    state.lastEventId = null;
    loadSnapshot().catch(() => {});
  });
  source.onerror = () => {
    source.close();
    if (state.source !== source) return;
    setLink("reconnecting…", "reconnecting");
    const delay = state.reconnectDelay;
    state.reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
    setTimeout(start, delay);
  };
}

async function start() {
  try {
    await loadSession();
    if (!state.session.may_read) {
      setLink("signed out", "reconnecting");
      return;
    }
    // The snapshot first when starting over; events after it.
    if (!state.lastEventId) await loadSnapshot();
    connect();
  } catch {
    setLink("reconnecting…", "reconnecting");
    const delay = state.reconnectDelay;
    state.reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
    setTimeout(start, delay);
  }
}

// --- Operators -----------------------------------------------------------------

async function loadSession() {
  const response = await fetch("/api/session", { cache: "no-store" });
  if (!response.ok) throw new Error(`session: HTTP ${response.status}`);
  state.session = await response.json();
  renderAccount();
}

function renderAccount() {
  const { operator, sign_in } = state.session;
  $("operator").textContent = operator ? `signed in as ${operator}` : sign_in ? "" : "read-only";
  $("sign-in").hidden = Boolean(operator) || !sign_in;
  $("sign-out").hidden = !operator;
  render();
}

async function post(path, body, method = "POST") {
  const response = await fetch(path, {
    method,
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

async function signIn(event) {
  event.preventDefault();
  $("sign-in-error").textContent = "";
  try {
    await post("/api/session", { token: $("token").value });
    $("token").value = "";
    const couldRead = state.session.may_read;
    await loadSession();
    if (!couldRead) start();
  } catch (error) {
    $("sign-in-error").textContent = error.message;
  }
}

async function signOut() {
  await post("/api/session", {}, "DELETE").catch(() => {});
  await loadSession().catch(() => {});
}

async function rollback(version) {
  const result = $("action-result");
  result.textContent = `rolling back to v${version}…`;
  try {
    const answer = await post("/api/rollback", {
      version,
      idempotency_key: crypto.randomUUID(),
    });
    result.textContent = `v${answer.version} published (rollback to v${version}) for ${answer.targets.length} nodes`;
    result.className = "action-result good";
  } catch (error) {
    result.textContent = `rollback failed: ${error.message}`;
    result.className = "action-result bad";
  }
}

async function controlRollout(version, action) {
  const result = $("action-result");
  result.textContent = `${action}: rollout of v${version}…`;
  try {
    const answer = await post("/api/rollout", { version, action });
    result.textContent = `rollout of v${version} ${answer.state}${action === "abort" ? ": " + answer.reason : ""}`;
    result.className = "action-result good";
    refreshSoon();
  } catch (error) {
    result.textContent = `${action} failed: ${error.message}`;
    result.className = "action-result bad";
  }
}

// A rollout moves without events of its own (waves, bake): while one
// runs, the snapshot is read again now and then.
const ROLLOUT_REFRESH_MS = 2000;

function watchRollouts() {
  setInterval(() => {
    const running = state.versions.some((v) => v.rollout && v.rollout.state === "running");
    if (running && state.source) refreshSoon();
  }, ROLLOUT_REFRESH_MS);
}

// --- Wiring --------------------------------------------------------------------

function setUp() {
  for (const th of $("nodes").tHead.rows[0].cells) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      state.sort = {
        key,
        descending: state.sort.key === key ? !state.sort.descending : key === "state" || key === "health",
      };
      render();
    });
  }
  $("node-filter").addEventListener("input", render);
  $("show-all").addEventListener("click", () => {
    state.rowLimit = Infinity;
    render();
  });
  $("event-filter").addEventListener("input", render);
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  watchRollouts();
  start();
}

setUp();
