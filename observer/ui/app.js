// membrane's flow page. Polls /api/flows (new flows since the last sequence number) and
// /api/map (the ring aggregated into workloads and verdict-coloured edges) with the form's
// filters, and renders them without any library. Data is inserted with textContent and
// DOM/SVG APIs only, never as HTML.
"use strict";

const POLL_MS = 2000;
const MAX_ROWS = 500;
const FIRST_LOAD = 200;
const CLASSES = ["forwarded", "dropped", "l7-denied", "redirected", "other"];
const SVG = "http://www.w3.org/2000/svg";

const form = document.getElementById("filters");
const tbody = document.querySelector("#flows tbody");
const svg = document.getElementById("map");
const errorBox = document.getElementById("error");
const live = document.getElementById("live");

let next = null; // sequence number to continue from; null = load the newest
let generation = 0; // bumped when the filters change, so stale answers are ignored
let timer = null;

function filterParams() {
  const params = new URLSearchParams();
  for (const el of form.elements) {
    if (el.name && el.value.trim() !== "") params.set(el.name, el.value.trim());
  }
  return params;
}

function restoreFilters() {
  const params = new URLSearchParams(location.search);
  for (const el of form.elements) {
    if (el.name && params.has(el.name)) el.value = params.get(el.name);
  }
}

function showError(message) {
  errorBox.hidden = !message;
  errorBox.textContent = message || "";
}

async function getJson(path, params) {
  const response = await fetch(path + "?" + params.toString(), { cache: "no-store" });
  const body = await response.json().catch(() => ({ error: "not JSON: HTTP " + response.status }));
  if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
  return body;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function pad(n, width) {
  return String(n).padStart(width, "0");
}

function clock(ms) {
  if (ms === null || ms === undefined) return "";
  const d = new Date(ms);
  return pad(d.getHours(), 2) + ":" + pad(d.getMinutes(), 2) + ":" + pad(d.getSeconds(), 2) + "." + pad(d.getMilliseconds(), 3);
}

function l7Text(l7) {
  if (!l7) return "";
  if (l7.http) {
    const h = l7.http;
    let text = (h.method || "") + " " + (h.path || h.url || "");
    if (h.code) text += " \u2192 " + h.code;
    return text.trim();
  }
  if (l7.dns) {
    const d = l7.dns;
    let text = "DNS " + d.query + " " + (d.qtypes || []).join(",");
    if (d.rcode) text += " \u2192 " + d.rcode;
    if (d.ips && d.ips.length) text += " " + d.ips.join(",");
    return text;
  }
  return l7.type || "";
}

function peerCell(text, ep) {
  const td = el("td", { title: (ep.labels || []).join("\n") }, text);
  const id = ep.identity_name ? ep.identity_name : ep.identity ? "ID:" + ep.identity : "";
  if (id) {
    td.appendChild(document.createTextNode(" "));
    td.appendChild(el("small", {}, "(" + id + ")"));
  }
  return td;
}

function row(f) {
  const tr = el("tr", { class: "c-" + f.class, "data-verdict": f.verdict, "data-seq": f.seq });
  tr.appendChild(el("td", { title: f.time || "" }, clock(f.time_ms)));
  tr.appendChild(peerCell(f.source_text, f.source));
  tr.appendChild(peerCell(f.destination_text, f.destination));
  const verdict = el("td", { class: "verdict" });
  verdict.appendChild(el("span", { class: "badge c-" + f.class, title: f.verdict_text }, f.verdict));
  if (f.drop_reason_text) {
    verdict.appendChild(document.createTextNode(" "));
    verdict.appendChild(el("small", { title: f.drop_reason }, f.drop_reason_text));
  }
  tr.appendChild(verdict);
  tr.appendChild(el("td", {}, f.flow_type));
  const dir = { INGRESS: "in", EGRESS: "out" }[f.traffic_direction] || "";
  tr.appendChild(el("td", { title: f.traffic_direction }, dir));
  tr.appendChild(el("td", { class: "l7" }, l7Text(f.l7)));
  tr.appendChild(el("td", { class: "summary" }, (f.l4 ? f.l4 + " " : "") + f.summary));
  return tr;
}

function addFlows(flows) {
  // Flows arrive oldest first; the table shows the newest on top.
  for (const f of flows) tbody.insertBefore(row(f), tbody.firstChild);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
}

function showStatus(answer) {
  const s = answer.status;
  let text = s.num_flows + " events in the ring (max " + s.max_flows + "), " + s.seen_flows + " seen";
  if (answer.lost_events) text += ", " + answer.lost_events + " lost";
  document.getElementById("status").textContent = text + " \u00b7 " + s.version;
  let info = tbody.rows.length + " shown";
  if (answer.overwritten || answer.skipped) info += " (some flows went by faster than the page polled)";
  document.getElementById("table-info").textContent = info;
}

// --- service map -----------------------------------------------------------------------

function layout(nodes, width, height) {
  // Pods first (by namespace and name), then the other peers, around an ellipse.
  const sorted = nodes.slice().sort((a, b) =>
    (a.kind === "pod" ? 0 : 1) - (b.kind === "pod" ? 0 : 1) || a.id.localeCompare(b.id));
  const pos = new Map();
  const cx = width / 2, cy = height / 2;
  const rx = Math.max(40, width / 2 - 90), ry = Math.max(40, height / 2 - 45);
  sorted.forEach((n, i) => {
    if (sorted.length === 1) return pos.set(n.id, { x: cx, y: cy });
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / sorted.length;
    pos.set(n.id, { x: cx + rx * Math.cos(angle), y: cy + ry * Math.sin(angle) });
  });
  return pos;
}

function drawMap(map) {
  const box = svg.getBoundingClientRect();
  const width = Math.max(300, box.width), height = Math.max(300, box.height);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.replaceChildren();
  const defs = svgEl("defs");
  for (const c of CLASSES) {
    const marker = svgEl("marker", {
      id: "arrow-" + c, viewBox: "0 0 10 10", refX: "5", refY: "5",
      markerWidth: "5", markerHeight: "5", orient: "auto", markerUnits: "strokeWidth",
    });
    marker.appendChild(svgEl("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow c-" + c }));
    defs.appendChild(marker);
  }
  svg.appendChild(defs);

  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const c of CLASSES) {
    const count = map.classes[c];
    if (!count) continue;
    const item = el("span");
    item.appendChild(el("i", { class: "c-" + c }));
    item.appendChild(document.createTextNode(c + " " + count));
    legend.appendChild(item);
  }
  document.getElementById("map-info").textContent =
    map.nodes.length + " workloads, " + map.edges.length + " edges";
  if (map.nodes.length === 0) {
    svg.appendChild(svgEl("text", { x: 20, y: 30, class: "empty" }, "no flows match"));
    return;
  }

  const pos = layout(map.nodes, width, height);
  // Parallel edges between the same two nodes (both directions, several verdicts) are
  // spread apart so each colour stays visible.
  const pairs = new Map();
  for (const e of map.edges) {
    const key = [e.source, e.target].sort().join("\u0000");
    if (!pairs.has(key)) pairs.set(key, []);
    pairs.get(key).push(e);
  }
  const edgeLayer = svgEl("g");
  for (const group of pairs.values()) {
    group.forEach((e, i) => {
      const a = pos.get(e.source), b = pos.get(e.target);
      const offset = (i - (group.length - 1) / 2) * 9;
      const cls = "c-" + e.class;
      if (e.source === e.target) {
        const path = svgEl("path", {
          d: "M" + (a.x + 20) + "," + (a.y - 16) + " c 40,-50 70,0 20,22",
          class: "edge " + cls, "marker-end": "url(#arrow-" + e.class + ")",
        });
        edgeLayer.appendChild(path);
        edgeLayer.appendChild(svgEl("text", { x: a.x + 66, y: a.y - 26, class: "edge-count " + cls }, String(e.count)));
        return;
      }
      // Offset perpendicular to the pair's canonical direction (same for both directions).
      const [p, q] = e.source < e.target ? [a, b] : [b, a];
      const len = Math.hypot(q.x - p.x, q.y - p.y) || 1;
      const nx = -(q.y - p.y) / len * offset, ny = (q.x - p.x) / len * offset;
      const x1 = a.x + nx, y1 = a.y + ny, x2 = b.x + nx, y2 = b.y + ny;
      const mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
      const path = svgEl("path", {
        d: "M" + x1 + "," + y1 + " L" + mx + "," + my + " L" + x2 + "," + y2,
        class: "edge " + cls, "marker-mid": "url(#arrow-" + e.class + ")",
        "data-source": e.source, "data-target": e.target, "data-class": e.class,
      });
      path.appendChild(svgEl("title", {}, e.source + " \u2192 " + e.target + ": " + e.count + " " + e.class));
      edgeLayer.appendChild(path);
      edgeLayer.appendChild(svgEl("text", {
        x: mx + (x2 - x1) / len * 22 + 4, y: my + (y2 - y1) / len * 22 - 4, class: "edge-count " + cls,
      }, String(e.count)));
    });
  }
  svg.appendChild(edgeLayer);

  const nodeLayer = svgEl("g");
  for (const n of map.nodes) {
    const p = pos.get(n.id);
    const name = n.kind === "pod" ? n.id.slice(n.id.indexOf("/") + 1) : n.id;
    const sub = n.kind === "pod" ? n.namespace : n.kind;
    const w = Math.max(name.length, sub.length) * 7 + 18, h = 34;
    const g = svgEl("g", { class: "node " + (n.kind === "pod" ? "pod" : "other"), "data-id": n.id });
    g.appendChild(svgEl("title", {}, n.id + " (" + n.flows + " flows)"));
    g.appendChild(svgEl("rect", { x: p.x - w / 2, y: p.y - h / 2, width: w, height: h, rx: 6 }));
    g.appendChild(svgEl("text", { x: p.x, y: p.y - 2, "text-anchor": "middle", "font-weight": "600" }, name));
    g.appendChild(svgEl("text", { x: p.x, y: p.y + 11, "text-anchor": "middle", class: "ns" }, sub));
    nodeLayer.appendChild(g);
  }
  svg.appendChild(nodeLayer);
}

// --- polling ---------------------------------------------------------------------------

let inFlight = false; // one request pair at a time, so no flow is added twice
let pending = false; // a poll was asked for while one was in flight
let lastMap = null;

async function poll() {
  clearTimeout(timer);
  if (inFlight) {
    pending = true;
    return;
  }
  inFlight = true;
  const mine = generation;
  const params = filterParams();
  const flowParams = new URLSearchParams(params);
  if (next === null) flowParams.set("limit", String(FIRST_LOAD));
  else flowParams.set("since", String(next));
  try {
    const [flows, map] = await Promise.all([getJson("/api/flows", flowParams), getJson("/api/map", params)]);
    if (mine === generation) {
      showError("");
      addFlows(flows.flows);
      next = flows.next;
      showStatus(flows);
      lastMap = map;
      drawMap(map);
    }
  } catch (e) {
    if (mine === generation) showError(e.message);
  } finally {
    inFlight = false;
  }
  if (pending) {
    pending = false;
    poll();
  } else if (live.checked) {
    timer = setTimeout(poll, POLL_MS);
  }
}

function restart() {
  generation += 1;
  next = null;
  tbody.replaceChildren();
  const params = filterParams().toString();
  history.replaceState(null, "", location.pathname + (params ? "?" + params : ""));
  poll();
}

let debounce = null;
form.addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(restart, 300);
});
form.addEventListener("reset", () => setTimeout(restart, 0));
form.addEventListener("submit", (e) => { e.preventDefault(); restart(); });
live.addEventListener("change", () => { if (live.checked) poll(); else clearTimeout(timer); });
window.addEventListener("resize", () => { if (lastMap) drawMap(lastMap); });

restoreFilters();
poll();
