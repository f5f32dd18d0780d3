// WarrenMQ's web console. It has no build step and no dependencies because it
// ships inside the broker binary, must work without internet access, and should
// stay readable by whoever operates the broker.
//
// Queue names, routing keys and payloads are whatever clients chose, so API data
// reaches the page only as text nodes or attribute values, never as markup.
// Figures sit in elements whose data-field is the figure's path in the API's JSON
// (e.g. "message_stats.publish_details.rate"), so that a test, or a person with
// the browser's inspector, can tell which number is which.
'use strict';

const REFRESH_MS = 5000;
const CREDENTIALS = 'warrenmq.console.credentials';
// The counters of RabbitMQ's message_stats, in the order its UI shows them.
const MESSAGE_STATS = [
  ['publish', 'Publish'],
  ['deliver_get', 'Deliver / get'],
  ['ack', 'Consumer ack'],
  ['confirm', 'Publisher confirm'],
  ['redeliver', 'Redelivered'],
  ['return_unroutable', 'Unroutable (return)'],
  ['drop_unroutable', 'Unroutable (drop)'],
];
// The API's name for the default exchange, whose real name is "".
const DEFAULT_EXCHANGE = 'amq.default';

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

/** An element with attributes and children; strings become text, never markup. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The value at a dotted path ("queue_totals.messages"), or undefined. */
function pick(object, path) {
  let value = object;
  for (const key of path.split('.')) {
    if (value === null || typeof value !== 'object') return undefined;
    value = value[key];
  }
  return value;
}

// A figure the broker does not report (yet) is shown as 0, as RabbitMQ's UI
// does, rather than as a blank that looks like a rendering bug.
const FORMATS = {
  count: (v) => String(Number.isFinite(Number(v)) && v !== null && v !== '' ? Number(v) : 0),
  rate: (v) => (Number.isFinite(Number(v)) && v !== null && v !== '' ? Number(v) : 0).toFixed(2),
  bool: (v) => (v ? 'yes' : 'no'),
  json: (v) => (v === undefined || v === null ? '' : JSON.stringify(v)),
  text: (v) => (v === undefined || v === null ? '' : String(v)),
};

/** Sets every [data-field] under `root` from `object`, formatted by its data-format. */
function fill(root, object) {
  for (const node of root.querySelectorAll('[data-field]')) {
    const format = FORMATS[node.dataset.format || 'text'];
    node.textContent = format(pick(object, node.dataset.field));
  }
}

const exchangeLabel = (name) => (name === '' ? '(AMQP default)' : name);
const exchangeHash = (vhost, name) => `#/exchanges/${enc(vhost)}/${enc(name === '' ? DEFAULT_EXCHANGE : name)}`;
const queueHash = (vhost, name) => `#/queues/${enc(vhost)}/${enc(name)}`;
const queuePath = (vhost, name) => `queues/${enc(vhost)}/${enc(name)}`;
const exchangePath = (vhost, name) => `exchanges/${enc(vhost)}/${enc(name === '' ? DEFAULT_EXCHANGE : name)}`;

// ---- the API -----------------------------------------------------------------

function loadCredentials() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(CREDENTIALS) || 'null');
    return saved && typeof saved.username === 'string' ? saved : null;
  } catch {
    return null;
  }
}

function basicAuth({ username, password }) {
  // btoa takes Latin-1 only; the API decodes the credentials as UTF-8.
  const bytes = new TextEncoder().encode(`${username}:${password}`);
  return `Basic ${btoa(String.fromCharCode(...bytes))}`;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.reason ? String(body.reason) : `HTTP ${status}`);
    this.status = status;
  }
}

/** One API call with the stored credentials; a 401 ends the session. */
async function api(path, { method = 'GET', body, headers = {} } = {}) {
  const credentials = loadCredentials();
  if (!credentials) {
    showLogin('');
    throw new ApiError(401, { reason: 'Not logged in' });
  }
  const init = {
    method,
    headers: { ...headers, Authorization: basicAuth(credentials) },
    cache: 'no-store',
    // Without this, a 401's Basic challenge would pop up the browser's own
    // password dialog instead of coming back to the console.
    credentials: 'omit',
  };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const response = await fetch(`api/${path}`, init);
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { reason: text };
    }
  }
  if (response.status === 401) {
    const error = new ApiError(401, data);
    showLogin(error.message);
    throw error;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// ---- messages to the user --------------------------------------------------------

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

function showNotice(message) {
  $('notice').textContent = message;
  $('notice').hidden = !message;
}

// ---- tables --------------------------------------------------------------------

/**
 * A table whose refresh(rows) redraws the body only when the rows changed, so
 * that a refresh does not pull a button away from under a pointer.
 * columns: {field, label, format, show(value), link(row), cell(row)}; key(row) is
 * [vhost, name] for the row's data-vhost and data-name.
 */
function table(id, columns, key) {
  const body = el('tbody');
  const node = el('table', { id, 'data-test': id },
    el('thead', {}, el('tr', {}, columns.map((c) => el('th', { scope: 'col' }, c.label)))),
    body);
  let drawn = null;
  node.refresh = (rows) => {
    const snapshot = JSON.stringify(rows);
    if (snapshot === drawn) return;
    drawn = snapshot;
    body.replaceChildren(...rows.map((row) => {
      const [vhost, name] = key(row);
      return el('tr', { 'data-test': 'row', 'data-vhost': vhost, 'data-name': name },
        columns.map((c) => {
          const cell = el('td', { 'data-field': c.field, 'data-format': c.format, class: c.format });
          if (c.cell) {
            cell.append(c.cell(row));
          } else {
            const text = (c.show || FORMATS[c.format || 'text'])(pick(row, c.field));
            cell.append(c.link ? el('a', { href: c.link(row) }, text) : text);
          }
          return cell;
        }));
    }));
    if (rows.length === 0) {
      body.append(el('tr', { class: 'empty' }, el('td', { colspan: columns.length }, 'None.')));
    }
  };
  return node;
}

/** A definition list of figures, each dd carrying its data-field and format. */
function figures(fields) {
  return el('dl', { class: 'figures' }, fields.map(([field, label, format]) => [
    el('dt', {}, label),
    el('dd', { id: `field-${field.replace(/[._]/g, '-')}`, 'data-field': field, 'data-format': format || 'text' }),
  ]));
}

/** A form whose async submit handler reports failures next to its button. */
function form(id, fields, buttonLabel, onSubmit) {
  const status = el('span', { class: 'form-status', 'data-test': `${id}-status` });
  const button = el('button', { type: 'submit', id: `${id}-submit` }, buttonLabel);
  return el('form', {
    id,
    'data-test': id,
    onsubmit: async (event) => {
      event.preventDefault();
      button.disabled = true;
      status.textContent = '';
      try {
        await onSubmit(event.target);
      } catch (e) {
        if (e.status !== 401) status.textContent = e.message;
      } finally {
        button.disabled = false;
      }
    },
  }, fields, el('p', {}, button, ' ', status));
}

const RATES = [
  ['message_stats.publish_details.rate', 'Incoming /s', 'rate'],
  ['message_stats.deliver_get_details.rate', 'Deliver / get /s', 'rate'],
  ['message_stats.ack_details.rate', 'Ack /s', 'rate'],
];

// ---- pages ---------------------------------------------------------------------
// Each page returns {node, refresh}: the node is built once, refresh() fetches and
// updates it, so that forms keep what the user typed across the 5 s refreshes.

function overviewPage() {
  const totals = figures([
    ['object_totals.connections', 'Connections', 'count'],
    ['object_totals.channels', 'Channels', 'count'],
    ['object_totals.exchanges', 'Exchanges', 'count'],
    ['object_totals.queues', 'Queues', 'count'],
    ['object_totals.consumers', 'Consumers', 'count'],
  ]);
  const messages = figures([
    ['queue_totals.messages', 'Total', 'count'],
    ['queue_totals.messages_ready', 'Ready', 'count'],
    ['queue_totals.messages_unacknowledged', 'Unacknowledged', 'count'],
  ]);
  const rates = el('table', { id: 'message-rates', 'data-test': 'message-rates' },
    el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Messages'), el('th', { scope: 'col' }, 'Count'),
      el('th', { scope: 'col' }, 'Rate /s'))),
    el('tbody', {}, MESSAGE_STATS.map(([stat, label]) => el('tr', { 'data-name': stat },
      el('th', { scope: 'row' }, label),
      el('td', { class: 'count', 'data-field': `message_stats.${stat}`, 'data-format': 'count' }),
      el('td', { class: 'rate', 'data-field': `message_stats.${stat}_details.rate`, 'data-format': 'rate' })))));
  const version = el('p', { class: 'muted' }, el('span', { 'data-field': 'product_name' }), ' ',
    el('span', { 'data-field': 'product_version' }), ' (RabbitMQ ',
    el('span', { 'data-field': 'rabbitmq_version' }), ' management API) on ', el('span', { 'data-field': 'node' }));
  const node = el('div', { id: 'overview' }, el('h2', {}, 'Overview'), version,
    el('h3', {}, 'Totals'), totals, el('h3', {}, 'Queued messages'), messages,
    el('h3', {}, 'Message rates'), rates);
  return { node, refresh: async () => fill(node, await api('overview')) };
}

function queuesPage() {
  const list = table('queues', [
    { field: 'vhost', label: 'Virtual host' },
    { field: 'name', label: 'Name', link: (q) => queueHash(q.vhost, q.name) },
    { field: 'type', label: 'Type' },
    { field: 'state', label: 'State' },
    { field: 'consumers', label: 'Consumers', format: 'count' },
    { field: 'messages_ready', label: 'Ready', format: 'count' },
    { field: 'messages_unacknowledged', label: 'Unacked', format: 'count' },
    { field: 'messages', label: 'Total', format: 'count' },
    ...RATES.map(([field, label, format]) => ({ field, label, format })),
  ], (q) => [q.vhost, q.name]);
  return {
    node: el('div', {}, el('h2', {}, 'Queues'), list),
    refresh: async () => list.refresh(await api('queues')),
  };
}

function queuePage(vhost, name) {
  const path = queuePath(vhost, name);
  const details = figures([
    ['vhost', 'Virtual host'], ['name', 'Name'], ['type', 'Type'], ['state', 'State'],
    ['durable', 'Durable', 'bool'], ['auto_delete', 'Auto-delete', 'bool'], ['exclusive', 'Exclusive', 'bool'],
    ['arguments', 'Arguments', 'json'], ['consumers', 'Consumers', 'count'],
    ['messages_ready', 'Ready', 'count'], ['messages_unacknowledged', 'Unacknowledged', 'count'],
    ['messages', 'Total', 'count'], ...RATES,
  ]);
  const got = el('div', { id: 'messages', 'data-test': 'messages' });
  const getForm = form('get-messages', [
    el('label', {}, 'Messages ', el('input', { name: 'count', type: 'number', min: 1, value: 1, required: true })),
    el('label', {}, 'Ack mode ', el('select', { name: 'ackmode' },
      el('option', { value: 'ack_requeue_true' }, 'Nack message, requeue'),
      el('option', { value: 'ack_requeue_false' }, 'Ack message (removes it)'),
      el('option', { value: 'reject_requeue_true' }, 'Reject, requeue'))),
  ], 'Get messages', async (f) => {
    const messages = await api(`${path}/get`, {
      method: 'POST',
      body: { count: Number(f.elements.count.value), ackmode: f.elements.ackmode.value, encoding: 'auto', truncate: 50000 },
    });
    got.replaceChildren(
      el('p', { 'data-test': 'messages-count' }, messages.length === 0 ? 'The queue is empty.'
        : `${messages.length} message${messages.length === 1 ? '' : 's'}:`),
      ...messages.map(messageView));
    await refresh();
  });
  const node = el('div', { id: 'queue' },
    el('h2', {}, 'Queue ', el('span', { 'data-test': 'queue-name' }, name)),
    details,
    el('h3', {}, 'Get messages'), getForm, got,
    el('h3', {}, 'Purge and delete'),
    el('p', {},
      el('button', { type: 'button', id: 'purge', 'data-test': 'purge', onclick: () => act(
        `Purge every ready message of queue "${name}"?`,
        () => api(`${path}/contents`, { method: 'DELETE' }), 'Queue purged.', () => refresh()) }, 'Purge messages'),
      ' ',
      el('button', { type: 'button', id: 'delete', class: 'danger', 'data-test': 'delete', onclick: () => act(
        `Delete queue "${name}" and its messages?`,
        () => api(path, { method: 'DELETE' }), 'Queue deleted.', () => {
          keepNotice = true;
          location.hash = '#/queues';
        }) },
      'Delete queue')));
  return { node, refresh: async () => fill(details, await api(path)) };
}

function messageView(m, index) {
  return el('article', { class: 'message', 'data-test': 'message', 'data-index': index },
    el('dl', {},
      el('dt', {}, 'Exchange'), el('dd', { 'data-field': 'exchange' }, exchangeLabel(m.exchange || '')),
      el('dt', {}, 'Routing key'), el('dd', { 'data-field': 'routing_key' }, m.routing_key),
      el('dt', {}, 'Redelivered'), el('dd', { 'data-field': 'redelivered' }, FORMATS.bool(m.redelivered)),
      el('dt', {}, 'Left in queue'), el('dd', { 'data-field': 'message_count' }, FORMATS.count(m.message_count)),
      el('dt', {}, 'Properties'), el('dd', {}, el('pre', { 'data-field': 'properties' },
        JSON.stringify(m.properties || {}, null, 2))),
      el('dt', {}, 'Payload'), el('dd', {},
        el('span', { class: 'muted' }, `${FORMATS.count(m.payload_bytes)} bytes, `,
          el('span', { 'data-field': 'payload_encoding' }, m.payload_encoding)),
        el('pre', { 'data-field': 'payload' }, m.payload))));
}

/** Asks, runs a destructive call, then tells the user and moves on. */
async function act(question, call, done, then) {
  if (!window.confirm(question)) return;
  try {
    await call();
    showNotice(done);
    showError('');
    await then();
  } catch (e) {
    if (e.status !== 401) showError(e.message);
  }
}

function exchangesPage() {
  const list = table('exchanges', [
    { field: 'vhost', label: 'Virtual host' },
    { field: 'name', label: 'Name', show: exchangeLabel, link: (x) => exchangeHash(x.vhost, x.name) },
    { field: 'type', label: 'Type' },
    { field: 'durable', label: 'Durable', format: 'bool' },
    { field: 'auto_delete', label: 'Auto-delete', format: 'bool' },
    { field: 'internal', label: 'Internal', format: 'bool' },
  ], (x) => [x.vhost, x.name]);
  return {
    node: el('div', {}, el('h2', {}, 'Exchanges'), list),
    refresh: async () => list.refresh(await api('exchanges')),
  };
}

function bindingColumns() {
  return [
    { field: 'vhost', label: 'Virtual host' },
    { field: 'source', label: 'Source', show: exchangeLabel, link: (b) => exchangeHash(b.vhost, b.source) },
    { field: 'destination', label: 'Destination',
      link: (b) => (b.destination_type === 'queue' ? queueHash(b.vhost, b.destination) : exchangeHash(b.vhost, b.destination)) },
    { field: 'destination_type', label: 'Type' },
    { field: 'routing_key', label: 'Routing key' },
    { field: 'arguments', label: 'Arguments', format: 'json' },
  ];
}

const bindingKey = (b) => [b.vhost, `${b.source}\u0000${b.destination_type}\u0000${b.destination}\u0000${b.properties_key}`];

/** The exchange's bindings as source: RabbitMQ's own route when the broker has it, else the vhost's list filtered. */
async function sourceBindings(vhost, name) {
  try {
    return await api(`${exchangePath(vhost, name)}/bindings/source`);
  } catch (e) {
    if (e.status !== 404) throw e;
    const all = await api(`bindings/${enc(vhost)}`);
    return all.filter((b) => b.source === name);
  }
}

function exchangePage(vhost, name) {
  const path = exchangePath(vhost, name);
  const details = figures([
    ['vhost', 'Virtual host'], ['type', 'Type'], ['durable', 'Durable', 'bool'],
    ['auto_delete', 'Auto-delete', 'bool'], ['internal', 'Internal', 'bool'], ['arguments', 'Arguments', 'json'],
  ]);
  const bindings = table('exchange-bindings', bindingColumns(), bindingKey);
  const result = el('p', { id: 'publish-result', 'data-test': 'publish-result', role: 'status' });
  let published = 0;
  const publishForm = form('publish', [
    el('label', {}, 'Routing key ', el('input', { name: 'routing_key', id: 'publish-routing-key' })),
    el('label', {}, 'Delivery mode ', el('select', { name: 'delivery_mode' },
      el('option', { value: '1' }, '1 - Non-persistent'), el('option', { value: '2' }, '2 - Persistent'))),
    el('label', { class: 'wide' }, 'Payload ', el('textarea', { name: 'payload', id: 'publish-payload', rows: 4 })),
  ], 'Publish message', async (f) => {
    result.textContent = '';
    result.removeAttribute('data-routed');
    const reply = await api(`${path}/publish`, {
      method: 'POST',
      body: {
        properties: { delivery_mode: Number(f.elements.delivery_mode.value) },
        routing_key: f.elements.routing_key.value,
        payload: f.elements.payload.value,
        payload_encoding: 'string',
      },
    });
    published += 1;
    result.dataset.routed = String(Boolean(reply.routed));
    result.dataset.sequence = String(published);
    result.textContent = reply.routed ? 'Message published and routed.'
      : 'Message published, but not routed: no queue is bound with that key.';
  });
  const node = el('div', { id: 'exchange' },
    el('h2', {}, 'Exchange ', el('span', { 'data-test': 'exchange-name' }, exchangeLabel(name))),
    details, el('h3', {}, 'Bindings from this exchange'), bindings,
    el('h3', {}, 'Publish message'), publishForm, result);
  return {
    node,
    refresh: async () => {
      const [exchange, list] = await Promise.all([api(path), sourceBindings(vhost, name)]);
      fill(details, exchange);
      bindings.refresh(list);
    },
  };
}

function bindingsPage() {
  const list = table('bindings', bindingColumns(), bindingKey);
  return {
    node: el('div', {}, el('h2', {}, 'Bindings'), list),
    refresh: async () => list.refresh(await api('bindings')),
  };
}

function connectionsPage() {
  const list = table('connections', [
    { field: 'name', label: 'Name' },
    { field: 'user', label: 'User' },
    { field: 'vhost', label: 'Virtual host' },
    { field: 'peer_host', label: 'Peer host' },
    { field: 'peer_port', label: 'Peer port', format: 'count' },
    { field: 'channels', label: 'Channels', format: 'count' },
    { field: 'state', label: 'State' },
    { field: 'close', label: '', cell: (c) => el('button', { type: 'button', 'data-test': 'close', onclick: () => act(
      `Close connection "${c.name}"?`,
      () => api(`connections/${enc(c.name)}`, { method: 'DELETE', headers: { 'X-Reason': 'closed from the console' } }),
      // The broker closes the connection after answering; give it a moment so
      // that the refresh no longer lists it.
      'Connection closed.', () => new Promise((done) => { setTimeout(done, 300); }).then(refresh)) }, 'Close') },
  ], (c) => [c.vhost || '', c.name]);
  return {
    node: el('div', {}, el('h2', {}, 'Connections'), list),
    refresh: async () => list.refresh(await api('connections')),
  };
}

// ---- routing and the session -------------------------------------------------------

const PAGES = {
  overview: overviewPage,
  queues: (vhost, name) => (name === undefined ? queuesPage() : queuePage(vhost, name)),
  exchanges: (vhost, name) => (name === undefined ? exchangesPage()
    : exchangePage(vhost, name === DEFAULT_EXCHANGE ? '' : name)),
  bindings: bindingsPage,
  connections: connectionsPage,
};

let view = null;
let generation = 0;
let keepNotice = false;

/** The page and its arguments from "#/queues/%2F/name". */
function parseHash() {
  try {
    const [page, ...args] = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
    if (Object.hasOwn(PAGES, page) && args.length <= 2) return { page, args: args.length === 2 ? args : [] };
  } catch {
    // A hand-typed malformed hash: fall through to the overview.
  }
  return { page: 'overview', args: [] };
}

async function showPage() {
  if (!loadCredentials()) return;
  const { page, args } = parseHash();
  generation += 1;
  view = PAGES[page](...args);
  for (const tab of document.querySelectorAll('#tabs a')) {
    tab.classList.toggle('active', tab.dataset.tab === page);
  }
  $('page').replaceChildren(view.node);
  $('page').dataset.page = page;
  await refresh();
}

/** Re-reads the current page's data; a late answer for a page already left is dropped. */
async function refreshOnce() {
  if (!view) return;
  const mine = generation;
  try {
    await view.refresh();
    if (mine === generation) {
      showError('');
      $('refreshed-at').textContent = new Date().toLocaleTimeString();
      $('refreshed-at').dataset.at = String(Date.now());
    }
  } catch (e) {
    if (mine === generation && e.status !== 401) {
      showError(e.status === 404 ? 'Not found: it may have been deleted.' : e.message);
    }
  }
}

// One refresh at a time, but a refresh asked for during one (say, after a purge)
// runs again afterwards rather than being dropped, so the page never shows the
// figures from before the user's own action.
let running = null;
let queued = null;
function refresh() {
  if (!running) {
    running = refreshOnce().finally(() => {
      running = null;
    });
    return running;
  }
  if (!queued) {
    queued = running.then(() => {
      queued = null;
      return refresh();
    });
  }
  return queued;
}

function showLogin(reason) {
  sessionStorage.removeItem(CREDENTIALS);
  view = null;
  generation += 1;
  for (const id of ['tabs', 'session', 'page', 'error', 'notice', 'refreshed']) $(id).hidden = true;
  $('page').replaceChildren();
  $('login').hidden = false;
  $('login-error').textContent = reason;
  $('login-password').value = '';
  $('login-username').focus();
}

async function startSession() {
  const me = await api('whoami');
  $('whoami').textContent = me.name;
  $('login').hidden = true;
  for (const id of ['tabs', 'session', 'page', 'refreshed']) $(id).hidden = false;
  if (!location.hash) location.replace('#/overview');
  await showPage();
}

$('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  $('login-error').textContent = '';
  $('login-submit').disabled = true;
  sessionStorage.setItem(CREDENTIALS, JSON.stringify({
    username: $('login-username').value,
    password: $('login-password').value,
  }));
  try {
    await startSession();
  } catch (e) {
    // A 401 has already brought the form back with the API's reason.
    if (e.status !== 401) {
      sessionStorage.removeItem(CREDENTIALS);
      $('login-error').textContent = e.message;
    }
  } finally {
    $('login-submit').disabled = false;
  }
});

$('logout').addEventListener('click', () => showLogin(''));
window.addEventListener('hashchange', () => {
  // A notice belongs to the page it was given on, unless it says why the
  // console moved (a deleted queue's page is left for the list).
  if (!keepNotice) showNotice('');
  keepNotice = false;
  showPage();
});
setInterval(refresh, REFRESH_MS);

if (loadCredentials()) {
  startSession().catch((e) => {
    if (e.status !== 401) showLogin(e.message);
  });
} else {
  showLogin('');
}
