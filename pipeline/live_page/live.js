// infinity-rope live page: steer the video over one websocket, play its frames at the video's fps.
// Protocol: see pipeline/live_server.py. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("screen");
const ctx = canvas.getContext("2d");

const page = {
  ws: null,
  settings: { fps: 16 },
  role: "viewer",
  state: { running: false, paused: false },
  frames: [],          // decoded frames waiting to be shown: {bitmap, block, first}
  incoming: null,      // the block whose binary frames are arriving: {meta, left}
  nextDue: 0,          // performance.now() at which the next frame is due
  played: 0,           // frames shown
  generated: 0,        // frames received
  refs: 0,             // our own request counter
  rows: new Map(),     // action id -> table row
  pressed: new Map(),  // request ref -> performance.now() of the key press
  sent: new Map(),     // request ref -> the fields it sent, cleared once the server accepts it
  landedOn: new Map(), // block index -> action id that starts on it (delay measured at its first frame)
};

// ---------------------------------------------------------------------------------- connection
function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "blob";
  page.ws = ws;
  ws.onopen = () => badge("connection", "connected", "ok");
  ws.onmessage = (event) => (typeof event.data === "string" ? onJSON(JSON.parse(event.data)) : onFrame(event.data));
  ws.onclose = (event) => {
    badge("connection", "disconnected, reconnecting…", "bad");
    if (event.code === 1009) say("error", "that message was too large, so the server closed the connection; reconnecting");
    page.incoming = null;
    page.sent.clear();  // unanswered: what they sent stays in the fields
    setTimeout(connect, 1000);
  };
}

function send(message) {
  if (!page.ws || page.ws.readyState !== WebSocket.OPEN) {
    say("error", "not connected to the server; wait for it to reconnect");
    return null;
  }
  message.ref = ++page.refs;
  page.ws.send(JSON.stringify(message));
  return message.ref;
}

function onJSON(m) {
  switch (m.type) {
    case "hello":
      page.settings = m.settings;
      canvas.width = m.settings.width;
      canvas.height = m.settings.height;
      if ($("seed").value === "") $("seed").value = m.settings.seed;
      page.role = m.role;
      setState(m.state);
      for (const a of m.state.actions) addRow(a);
      break;
    case "state":
      page.role = m.role;
      setState(m.state);
      break;
    case "started":  // a new session: a fresh player (its frames follow this message)
      page.frames = [];
      page.played = page.generated = 0;
      clearLog();
      addRow(m.action, m.ref);
      accepted(m.ref);
      say("", `started: recording ${m.video}`);
      break;
    case "queued":
      addRow(m.action, m.ref);
      accepted(m.ref);
      say(m.action.warning ? "warning" : "", m.action.warning || `queued: “${m.action.text}” lands on the next block`);
      break;
    case "block":
      onBlock(m);
      break;
    case "stopped":
      showLast(m);
      say(m.error ? "error" : "", m.error || `stopped: ${m.frames} frames (${m.seconds.toFixed(2)} s) in ${m.video}`);
      break;
    case "warning":
      say("warning", m.message);
      break;
    case "error":  // a refused request: what was typed stays in the fields
      page.sent.delete(m.ref);
      page.pressed.delete(m.ref);
      say("error", m.message);
      break;
  }
}

function onBlock(m) {
  page.incoming = { meta: m, left: m.frames };
  page.generated += m.frames;
  $("stat-block").textContent = m.index;
  $("stat-generated").textContent = `${(m.video_seconds).toFixed(2)} s`;
  $("stat-speed").textContent = `${m.gen_fps.toFixed(1)} fps`;
  if (m.landed) {
    const row = page.rows.get(m.landed.id) || addRow({ id: m.landed.id, kind: m.landed.kind, text: m.landed.text, subtitle: m.landed.subtitle });
    row.dataset.block = m.index;
    row.querySelector(".landed").textContent = `block ${m.index}`;
    say("", `“${m.landed.text}” landed on block ${m.index}`);
    page.landedOn.set(m.index, m.landed.id);
  }
}

function onFrame(blob) {
  const incoming = page.incoming;
  if (!incoming) return;  // frames of a block we joined halfway
  const frame = { bitmap: null, block: incoming.meta.index, first: incoming.left === incoming.meta.frames };
  incoming.left -= 1;
  if (incoming.left === 0) page.incoming = null;
  page.frames.push(frame);
  createImageBitmap(blob).then((bitmap) => { frame.bitmap = bitmap; }, () => { frame.bitmap = "bad"; });
}

// ------------------------------------------------------------------------------------ playback
function tick(now) {
  const period = 1000 / page.settings.fps;
  if (!page.state.paused && page.frames.length && page.frames[0].bitmap) {
    if (now - page.nextDue > period) page.nextDue = now;  // we were starved: restart the clock
    if (now >= page.nextDue) {
      const frame = page.frames.shift();
      if (frame.bitmap !== "bad") {
        ctx.drawImage(frame.bitmap, 0, 0, canvas.width, canvas.height);
        frame.bitmap.close();
      }
      page.played += 1;
      page.nextDue += period;
      if (frame.first && page.landedOn.has(frame.block)) onLandedFrame(frame.block, now);
    }
  }
  if (page.state.running && !page.state.paused && page.played > 0) {
    $("stat-state").textContent = page.frames.length ? "running" : "waiting for frames (slower than real time)";
  }
  $("stat-played").textContent = `${(page.played / page.settings.fps).toFixed(2)} s`;
  $("stat-ahead").textContent = `${(page.frames.length / page.settings.fps).toFixed(2)} s`;
  requestAnimationFrame(tick);
}

function onLandedFrame(block, now) {
  const id = page.landedOn.get(block);
  page.landedOn.delete(block);
  const row = page.rows.get(id);
  if (!row || row.dataset.ref === undefined || !page.pressed.has(Number(row.dataset.ref))) return;
  const delay = (now - page.pressed.get(Number(row.dataset.ref))) / 1000;
  row.dataset.delay = delay.toFixed(3);
  row.querySelector(".delay").textContent = `${delay.toFixed(2)} s`;
}

// ------------------------------------------------------------------------------------- the log
function addRow(action, ref) {
  let row = page.rows.get(action.id);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.id = action.id;
    row.dataset.kind = action.kind;
    const cells = [action.id, { start: "start", flush: "next action", cut: "new scene" }[action.kind] || action.kind,
      action.text, action.subtitle || "", action.block === null || action.block === undefined ? "queued" : `block ${action.block}`, ""];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) td.className = `kind-${action.kind}`;
      if (i === 4) td.className = "landed";
      if (i === 5) td.className = "delay";
      row.appendChild(td);
    });
    if (action.block !== null && action.block !== undefined) row.dataset.block = action.block;
    $("actions").appendChild(row);
    page.rows.set(action.id, row);
  }
  if (ref !== undefined && ref !== null) row.dataset.ref = ref;
  return row;
}

function clearLog() {
  $("actions").textContent = "";
  page.rows.clear();
  page.landedOn.clear();
}

function showLast(m) {
  $("last").hidden = !m.video;
  $("last-video").textContent = m.video || "";
  $("last-seed").textContent = m.seed;
  $("transcript").textContent = m.transcript;
  $("replay").textContent = m.replay || "";  // quoted for the shell by the server
}

// ---------------------------------------------------------------------------------- state & UI
function setState(state) {
  page.state = state;
  const steering = page.role === "controller" || !state.controlled;
  badge("role", page.role === "controller" ? "you steer" : state.controlled ? "watching (another page steers)" : "watching (no one steers: any button takes over)",
        page.role === "controller" ? "ok" : "");
  $("stat-state").textContent = state.stopping ? "stopping…" : state.running ? (state.paused ? "paused" : "running") : "idle";
  $("start").disabled = !steering || state.running || state.stopping;
  for (const id of ["next", "scene", "pause", "stop"]) $(id).disabled = !steering || !state.running;
  $("pause").textContent = state.paused ? "Resume" : "Pause";
  if (state.last && !state.running) showLast(state.last);
}

function badge(id, text, kind) {
  const el = $(id);
  el.textContent = text;
  el.className = `badge ${kind || ""}`;
}

function say(kind, text) {
  const el = $("message");
  el.textContent = text;
  el.className = kind;
}

function steer(kind) {
  const text = $("action").value.trim();
  if (!text) return say("error", "type an action first");
  const subtitle = $("subtitle").value.trim();
  const limit = page.settings.max_text_chars;
  for (const [what, value] of [["action", text], ["subtitle", subtitle]]) {
    const chars = [...value].length;  // characters as the server counts them (code points)
    if (limit && chars > limit) return say("error", `the ${what} is ${chars} characters long; the limit is ${limit}`);
  }
  const message = kind === "start"
    ? { type: "start", text, subtitle, seed: Number($("seed").value) }
    : { type: "action", kind, text, subtitle };
  const ref = send(message);
  if (ref === null) return;
  page.pressed.set(ref, performance.now());
  page.sent.set(ref, { action: $("action").value, subtitle: $("subtitle").value });
}

// The server took request `ref` (started or queued): empty the fields, unless typed into since.
function accepted(ref) {
  const sent = page.sent.get(ref);
  if (!sent) return;
  page.sent.delete(ref);
  if ($("action").value === sent.action) $("action").value = "";
  if ($("subtitle").value === sent.subtitle) $("subtitle").value = "";
}

$("start").onclick = () => steer("start");
$("next").onclick = () => steer("next");
$("scene").onclick = () => steer("scene");
$("pause").onclick = () => send({ type: page.state.paused ? "resume" : "pause" });
$("stop").onclick = () => send({ type: "stop" });
$("action").addEventListener("keydown", (event) => {
  if (event.key !== "Enter") return;
  event.preventDefault();
  if (!page.state.running) steer("start");
  else steer(event.shiftKey ? "scene" : "next");
});

connect();
requestAnimationFrame(tick);
