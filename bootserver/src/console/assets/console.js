// The diskcast web console: a client of the JSON API (/api/v1) and its event stream
// (/api/v1/events). No framework, no build step: the server embeds this file as it is.
'use strict';

const RECENT_SECS = 3600; // finished tasks stay in the progress table this long
const TASK_ROWS = 100;

const state = {
  me: { admin: false, public_reads: true },
  machines: [],
  tasks: [],
  images: [],
  sessions: [],
  progress: new Map(), // task id -> latest progress event, for tasks without a session view
  selected: new Set(),
};

const $ = (id) => document.getElementById(id);

// An element with attributes (`on...` are listeners) and children (text is never parsed as HTML).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'value' || key === 'checked' || key === 'max') el[key] = value;
    else el.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// A table cell labelled for the phone layout, where each row becomes a card (and a blank cell
// is left out).
function cell(label, ...children) {
  const blank = children.flat().every((c) => c === null || c === undefined || c === false || c === '');
  return h('td', { 'data-label': label, class: blank ? 'blank' : null }, h('div', { class: 'v' }, ...children));
}

function size(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit + 1 < units.length) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function ago(secs) {
  if (secs === null || secs === undefined) return 'never';
  const d = Math.max(0, Math.round(Date.now() / 1000 - secs));
  if (d < 120) return `${d} s ago`;
  if (d < 7200) return `${Math.floor(d / 60)} min ago`;
  if (d < 172800) return `${Math.floor(d / 3600)} h ago`;
  return `${Math.floor(d / 86400)} days ago`;
}

const when = (secs) => h('time', { title: new Date(secs * 1000).toLocaleString() }, ago(secs));

function duration(secs) {
  if (secs === null || secs === undefined || !isFinite(secs)) return '';
  const s = Math.round(secs);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

const isOpen = (t) => t.state === 'pending' || t.state === 'booted' || t.state === 'running';
const taskLabel = (t) => (t.kind.image ? `${t.kind.kind} ${t.kind.image}` : t.kind.kind);

function machineName(mac) {
  const m = state.machines.find((x) => x.mac === mac);
  return m && m.name ? m.name : mac;
}

let toastTimer;
function toast(message, isError) {
  const el = $('toast');
  el.textContent = message;
  el.className = isError ? 'error shown' : 'shown';
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.className = ''; }, isError ? 10000 : 4000);
}

// One API call; a refusal throws with the server's reason.
async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { 'X-Diskcast-Console': '1' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.error) || text || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

// Loads run one at a time per kind; a change during a load makes it run once more after.
const loads = {};
function refresh(kind) {
  const load = loads[kind] || (loads[kind] = { running: false, again: false });
  if (load.running) { load.again = true; return; }
  load.running = true;
  const run = kind === 'registry' ? loadRegistry : loadStore;
  run()
    .catch((e) => {
      if (e.status === 401) needLogin(e.message);
      else toast(`Reading the ${kind === 'registry' ? 'machines and tasks' : 'image store'} failed: ${e.message}`, true);
    })
    .finally(() => {
      load.running = false;
      if (load.again) { load.again = false; refresh(kind); }
    });
}

async function loadRegistry() {
  const [machines, tasks] = await Promise.all([api('GET', '/api/v1/machines'), api('GET', '/api/v1/tasks?all=true')]);
  state.machines = machines;
  state.tasks = tasks;
  // Progress of tasks no session shows (captures, peer masters): their latest progress event.
  const inSessions = receivers();
  const wanted = tasks.filter((t) => t.state === 'running' && !inSessions.has(t.mac));
  const events = await Promise.all(wanted.map((t) => api('GET', `/api/v1/tasks/${t.id}`).catch(() => null)));
  state.progress = new Map();
  wanted.forEach((t, i) => {
    const found = events[i] && events[i].events.filter((e) => e.progress).pop();
    if (found) state.progress.set(t.id, found.progress);
  });
  renderMachines();
  renderTasks();
  renderProgress();
}

async function loadStore() {
  state.images = await api('GET', '/api/v1/images');
  renderImages();
}

function receivers() {
  const byMac = new Map();
  for (const s of state.sessions) {
    for (const r of s.receivers) byMac.set(r.mac, Object.assign({ session: s }, r));
  }
  return byMac;
}

// ---- live updates ---------------------------------------------------------------------------

let source = null;
function connect() {
  if (source) source.close();
  source = new EventSource('/api/v1/events');
  source.addEventListener('open', () => setLive(true));
  source.addEventListener('error', () => {
    setLive(false);
    // The browser retries by itself unless the server refused the stream (logged out).
    if (source.readyState === EventSource.CLOSED) setTimeout(start, 5000);
  });
  source.addEventListener('sessions', (e) => {
    state.sessions = JSON.parse(e.data);
    renderProgress();
  });
  source.addEventListener('registry', () => refresh('registry'));
  source.addEventListener('store', () => refresh('store'));
}

function setLive(live) {
  const el = $('live');
  el.textContent = live ? 'live' : 'reconnecting';
  el.className = live ? 'online' : 'offline';
}

// ---- who is looking -------------------------------------------------------------------------

async function start() {
  try {
    state.me = await api('GET', '/api/v1/me');
  } catch (e) {
    setLive(false);
    setTimeout(start, 5000);
    return;
  }
  renderWho();
  if (state.me.admin || state.me.public_reads) connect();
  else needLogin('');
}

function needLogin(message) {
  if (source) source.close();
  setLive(false);
  $('live').textContent = 'log in to look';
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('token').focus();
}

function renderWho() {
  const admin = state.me.admin;
  document.body.classList.toggle('admin', admin);
  $('who').textContent = admin ? 'admin' : state.me.public_reads ? 'read-only' : '';
  $('logout').hidden = !admin;
  $('show-login').hidden = admin;
  if (admin) $('login').hidden = true;
}

$('show-login').addEventListener('click', () => {
  const form = $('login');
  form.hidden = !form.hidden;
  if (!form.hidden) $('token').focus();
});

$('login').addEventListener('submit', async (e) => {
  e.preventDefault();
  try {
    await api('POST', '/api/v1/login', { token: $('token').value });
    $('token').value = '';
    $('login-error').textContent = '';
    await start();
    toast('Logged in: actions are on.');
  } catch (err) {
    $('login-error').textContent = err.message;
  }
});

$('logout').addEventListener('click', async () => {
  try { await api('POST', '/api/v1/logout'); } catch (_) { /* logged out anyway */ }
  await start();
});

// ---- progress -------------------------------------------------------------------------------

// What one machine's row shows: its newest task, joined with its live view in a session.
function progressModel(task, receiver) {
  const m = { task, percent: null, mbps: null, repairs: null, left: null, status: task.state, reason: task.reason, tone: task.state };
  const live = receiver && isOpen(task) ? receiver : null;
  const last = live || state.progress.get(task.id);
  if (task.state === 'verified') {
    m.percent = 100;
  } else if (live) {
    Object.assign(m, { percent: live.percent, mbps: live.mb_per_s, repairs: live.repairs, left: live.seconds_left, status: live.state, tone: live.state });
    if (live.failure) m.reason = live.failure;
  } else if (last) {
    Object.assign(m, { percent: last.percent, mbps: last.mb_per_s, repairs: last.repairs });
  }
  if (isOpen(task) && !live && !last) {
    const waiting = task.kind.kind === 'deploy' && state.sessions.find((s) => s.image === task.kind.image);
    m.status = task.state === 'pending'
      ? (waiting ? 'waiting to boot; the session waits' : 'waiting to boot')
      : task.state;
    m.percent = 0;
  }
  return m;
}

function progressRows() {
  const live = receivers();
  const now = Date.now() / 1000;
  const seen = new Set();
  const rows = [];
  for (const task of state.tasks) { // newest first: each machine's newest task
    if (seen.has(task.mac)) continue;
    seen.add(task.mac);
    if (!isOpen(task) && now - (task.finished || task.updated) > RECENT_SECS) continue;
    rows.push(progressModel(task, live.get(task.mac)));
  }
  rows.sort((a, b) => machineName(a.task.mac).localeCompare(machineName(b.task.mac)));
  return rows;
}

function renderProgress() {
  const sessions = $('sessions');
  sessions.replaceChildren(...state.sessions.map((s) => h('li', {},
    h('strong', {}, s.image), ' ',
    s.phase === 'waiting'
      ? `waiting for ${s.waiting_for} machine(s) to join`
      : `${s.phase}, ${s.receivers.length} machine(s), ${s.rate_mbps.toFixed(1)} MB/s on the wire`,
    s.group ? h('span', { class: 'muted' }, ` (${s.group}:${s.port}, relays on port ${s.relay_port})`) : null,
    (s.receivers || []).some((r) => r.relay)
      ? h('small', { class: 'muted' }, ` relays: ${s.receivers.filter((r) => r.relay).map((r) => {
        const local = s.receivers.filter((l) => l.via === r.mac);
        return `${r.mac} (${r.state}; ${local.length} local: ${local.map((l) => `${l.mac} ${l.state}`).join(', ') || 'none yet'})`;
      }).join('; ')}`)
      : null,
    (s.not_waiting_for || []).length
      ? h('small', { class: 'muted' }, ` not waiting for ${s.not_waiting_for.join('; ')}`)
      : null)));
  const rows = progressRows();
  $('progress-rows').replaceChildren(...rows.map((m) => {
    const t = m.task;
    const percent = m.percent === null ? null : Math.min(100, Math.max(0, m.percent));
    return h('tr', { 'data-mac': t.mac, 'data-state': m.status, class: `tone-${m.tone}` },
      cell('Machine', h('strong', {}, machineName(t.mac)), h('small', {}, t.mac)),
      cell('Task', `#${t.id} ${taskLabel(t)}`),
      cell('Progress', h('div', { class: 'meter' },
        h('progress', { max: 100, value: percent === null ? 0 : percent, 'data-mac': t.mac, 'aria-label': `${machineName(t.mac)} progress` }),
        h('span', { class: 'percent' }, percent === null ? '' : `${percent.toFixed(1)} %`))),
      cell('MB/s', m.mbps === null || m.mbps === undefined ? '' : m.mbps.toFixed(1)),
      cell('Repairs', m.repairs === null || m.repairs === undefined ? '' : String(m.repairs)),
      cell('Left', duration(m.left)),
      cell('State', h('span', { class: 'state' }, m.status), m.reason && m.status !== 'verified' ? h('span', { class: 'reason' }, m.reason) : null));
  }));
  $('progress-empty').hidden = rows.length > 0;
}

// ---- machines -------------------------------------------------------------------------------

function inventorySummary(machine) {
  if (!machine.inventory) return '';
  let inv;
  try { inv = JSON.parse(machine.inventory.json); } catch (_) { return 'unreadable'; }
  const parts = [];
  for (const d of inv.disks || []) {
    if (!d.boot_medium) parts.push(`${d.name} ${size(d.size_bytes)}${d.serial ? ` (${d.serial})` : ''}`);
  }
  for (const n of inv.nics || []) parts.push(`${n.name} ${n.driver}${n.link ? '' : ' no link'}`);
  for (const c of inv.unclaimed_network_controllers || []) parts.push(`no driver for ${c}`);
  return parts.join(', ');
}

function renderMachines() {
  const newest = new Map();
  for (const t of state.tasks) if (!newest.has(t.mac)) newest.set(t.mac, t);
  for (const mac of [...state.selected]) {
    if (!state.machines.some((m) => m.mac === mac)) state.selected.delete(mac);
  }
  $('machine-rows').replaceChildren(...state.machines.map((m) => {
    const t = newest.get(m.mac);
    const task = t ? [`#${t.id} ${taskLabel(t)}: `, h('span', { class: `state tone-${t.state}` }, t.state), t.reason ? h('span', { class: 'reason' }, t.reason) : null] : '';
    return h('tr', { 'data-mac': m.mac },
      h('td', { class: 'admin-only pick', 'data-label': 'Select' }, h('input', {
        type: 'checkbox', checked: state.selected.has(m.mac), 'aria-label': `Select ${m.name || m.mac}`,
        onchange: (e) => { if (e.target.checked) state.selected.add(m.mac); else state.selected.delete(m.mac); renderSelection(); },
      })),
      cell('Name', h('strong', {}, m.name || ''), m.known ? null : h('small', {}, 'discovered')),
      cell('MAC', m.mac),
      cell('Group', m.group ? `@${m.group}` : ''),
      cell('Firmware', m.firmware),
      cell('Last seen', m.last_seen ? when(m.last_seen) : 'never'),
      cell('Inventory', inventorySummary(m)),
      cell('Task', task));
  }));
  $('machines-empty').hidden = state.machines.length > 0;
  renderSelection();
}

function renderSelection() {
  const n = state.selected.size;
  $('selection').textContent = n ? `${n} selected` : 'select machines below';
  $('select-all').checked = n > 0 && n === state.machines.length;
}

$('select-all').addEventListener('change', (e) => {
  state.selected = new Set(e.target.checked ? state.machines.map((m) => m.mac) : []);
  renderMachines();
});

function renderKind() {
  const kind = $('kind').value;
  $('image').hidden = kind !== 'deploy';
  $('capture-name').hidden = kind !== 'capture';
  $('relays').hidden = kind !== 'deploy';
}
$('kind').addEventListener('change', renderKind);

$('actions').addEventListener('submit', async (e) => {
  e.preventDefault();
  const kind = $('kind').value;
  const request = { kind, to: [...state.selected].join(','), wake: $('wake').checked };
  if (!request.to) { toast('Select the machines first.', true); return; }
  if (kind === 'deploy') {
    request.image = $('image').value;
    const relays = $('relays').value.split(',').map((r) => r.trim()).filter((r) => r);
    if (relays.length) request.relays = relays;
  }
  if (kind === 'capture') request.image = $('capture-name').value.trim();
  try {
    const created = await api('POST', '/api/v1/tasks', request);
    toast(`Created ${created.map((t) => `task ${t.id}`).join(', ')}: machines run it when they network-boot.`);
    state.selected.clear();
    $('relays').value = '';
    refresh('registry');
  } catch (err) {
    toast(`No task created: ${err.message}`, true);
  }
});

$('wake-now').addEventListener('click', async () => {
  const to = [...state.selected].join(',');
  if (!to) { toast('Select the machines first.', true); return; }
  try {
    const answer = await api('POST', '/api/v1/wake', { to });
    toast(`Wake-on-LAN sent to ${answer.woken.length} machine(s).`);
  } catch (err) {
    toast(`Not woken: ${err.message}`, true);
  }
});

// ---- tasks ----------------------------------------------------------------------------------

function renderTasks() {
  const openOnly = $('open-only').checked;
  const tasks = state.tasks.filter((t) => !openOnly || isOpen(t)).slice(0, TASK_ROWS);
  $('task-rows').replaceChildren(...tasks.map((t) => h('tr', { 'data-task': t.id, class: `tone-${t.state}` },
    cell('#', String(t.id)),
    cell('Machine', machineName(t.mac)),
    cell('What', taskLabel(t)),
    cell('State', h('span', { class: 'state' }, t.state)),
    cell('Updated', when(t.updated)),
    cell('Why', t.reason && t.state !== 'cancelled' ? h('span', { class: 'reason' }, t.reason) : ''),
    h('td', { class: 'admin-only' }, isOpen(t) ? h('button', { type: 'button', class: 'cancel', onclick: () => cancel(t) }, 'Cancel') : null))));
  $('tasks-empty').hidden = tasks.length > 0;
}
$('open-only').addEventListener('change', renderTasks);

async function cancel(task) {
  try {
    await api('POST', `/api/v1/tasks/${task.id}/cancel`);
    toast(`Task ${task.id} cancelled: ${machineName(task.mac)} boots its local disk again.`);
    refresh('registry');
  } catch (err) {
    toast(`Task ${task.id} not cancelled: ${err.message}`, true);
  }
}

// ---- images ---------------------------------------------------------------------------------

function checkText(image) {
  const c = image.check;
  if (!c) return 'verified when stored';
  if (c.state === 'running') return 'verifying…';
  if (c.state === 'verified') return h('span', {}, 'verified ', when(c.at));
  return h('span', { class: 'reason' }, `failed ${ago(c.at)}: ${c.reason}`);
}

function renderImages() {
  const images = state.images;
  $('image-rows').replaceChildren(...images.map((i) => (i.error
    ? h('tr', { class: 'tone-failed' }, cell('Name', h('span', { class: 'reason' }, i.error)))
    : h('tr', { 'data-image': i.name },
      cell('Name', h('strong', {}, i.name)),
      cell('Disk', size(i.disk_bytes)),
      cell('Used', size(i.used_bytes)),
      cell('Data', size(i.data_bytes)),
      cell('Stored', size(i.stored_bytes)),
      cell('Ratio', `${(i.data_bytes / Math.max(1, i.stored_bytes)).toFixed(2)}x`),
      cell('Created', when(i.created)),
      cell('Origin', i.origin),
      cell('Check', checkText(i)),
      h('td', { class: 'admin-only' }, h('button', {
        type: 'button', disabled: i.check && i.check.state === 'running', onclick: () => verify(i.name),
      }, 'Verify'))))));
  $('images-empty').hidden = images.length > 0;
  const select = $('image');
  const chosen = select.value;
  select.replaceChildren(...images.filter((i) => !i.error).map((i) => h('option', { value: i.name }, i.name)));
  if (images.some((i) => i.name === chosen)) select.value = chosen;
}

async function verify(name) {
  try {
    await api('POST', `/api/v1/images/${encodeURIComponent(name)}/verify`);
    toast(`Verifying ${name}…`);
  } catch (err) {
    toast(`${name} not verified: ${err.message}`, true);
  }
}

// Relative times age while nothing changes.
setInterval(() => { renderMachines(); renderTasks(); renderImages(); }, 15000);

renderKind();
start();
