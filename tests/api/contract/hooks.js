// dredd hooks for docs/api.yaml, run by tests/api/contract/run.sh against a live qbrokerd.
//
// dredd sends each operation's request example and checks the answer against one documented
// response. The examples name a domain vm1 (with CD drive cd0), disk d1 on /srv/img/d1.img, NIC
// n0 on tap qbtap0 and a medium /srv/iso/x.iso; before each transaction these hooks bring the
// daemon to the state that response needs: vm1 booted (the test guest, so that it can release a
// device it is asked to unplug), the device there or not, the domain paused or not. Paths under
// /srv are mapped to the test guest and to the run's image root.
//
// dredd checks the 2xx response of every operation. Besides those, these hooks provoke and
// check the documented errors a request can bring about on its own: 400 (an unknown query
// parameter), 404 (a domain or image that does not exist), 409, 415 (a text/plain body) and 502
// (a QMP command QEMU does not know).
// Left to the server and flow tests, which can bring them about: 403 (a peer of another uid),
// 408, 413, 431 and 503 (limits), 500, 504 and 507 (faults of the host, QEMU or the guest).
// GET /v1/events is skipped: an event stream does not end, and dredd waits for the end of a
// body; tests/api/server_test.cpp reads it.
const fs = require('fs');
const hooks = require('hooks');
const http = require('http');
const net = require('net');
const yaml = require('js-yaml');  // dredd's own; run.sh puts its modules on NODE_PATH

const api = new URL(process.env.QB_API);
const doc = yaml.load(fs.readFileSync(process.env.QB_API_YAML, 'utf8'));
const guest = process.env.QB_GUEST_DIR;
const images = process.env.QB_IMAGES;
const kAppend = 'console=ttyS0 quiet panic=-1 cryptomgr.notests';
// A tap name of this run's own: tests running beside it plug taps too.
const kTap = `qbct${process.pid % 100000}`;

// One request to the daemon through the bridge: {status, json}.
function call(method, path, body) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? '' : JSON.stringify(body);
    const headers = {Host: 'localhost', Connection: 'close'};
    if (data) {
      headers['Content-Type'] = 'application/json';
      headers['Content-Length'] = Buffer.byteLength(data);
    }
    const req = http.request({host: api.hostname, port: api.port, method, path, headers}, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => (text += chunk));
      res.on('end', () => {
        let json = null;
        try {
          json = JSON.parse(text);
        } catch (e) {
          json = null;
        }
        resolve({status: res.statusCode, json});
      });
    });
    req.setTimeout(120000, () => req.destroy(new Error(`${method} ${path}: no answer in 120 s`)));
    req.on('error', reject);
    req.end(data);
  });
}

async function expect(status, method, path, body) {
  const r = await call(method, path, body);
  if (r.status !== status) {
    throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(r.json)}, not ${status}`);
  }
  return r.json;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The examples' names on this host: /srv/guest is the test guest, the rest of /srv the run's
// image root, and the tap one of the run's own.
function local(text) {
  return text.replace(/\/srv\/guest\//g, `${guest}/`)
      .replace(/\/srv\/(img|iso|state)\//g, `${images}/`)
      .replace(/"qbtap0"/g, `"${kTap}"`);
}

async function vm1() {
  const r = await call('GET', '/v1/domains/vm1?live=false');
  return r.status === 200 ? r.json : null;
}

// Whether the guest's shell answers on its console: it has booted, so it can release a device.
function shell_answers(console_path) {
  return new Promise((resolve) => {
    const sock = net.connect(console_path);
    let seen = '';
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.on('error', () => done(false));
    // The marker is split in the line sent, so the shell's echo of it never matches.
    sock.on('connect', () => sock.write('echo "@@E""N:$?@@"\n'));
    sock.on('data', (chunk) => {
      seen += chunk.toString('latin1');
      if (seen.includes('@@EN:')) done(true);
    });
  });
}

async function booted(domain) {
  for (let i = 0; i < 120; i++) {
    if (await shell_answers(domain.console)) return domain;
    await sleep(500);
  }
  throw new Error('the guest of vm1 did not boot in 60 s');
}

// vm1 running the test guest, booted, with its CD drive cd0.
async function running() {
  let d = await vm1();
  if (d && d.state !== 'running' && d.state !== 'paused') {
    await expect(200, 'DELETE', '/v1/domains/vm1');
    d = null;
  }
  if (!d) {
    d = await expect(201, 'POST', '/v1/domains', {
      name: 'vm1',
      memory_mib: 128,
      kernel: `${guest}/vmlinuz`,
      initrd: `${guest}/initramfs.cpio.gz`,
      append: kAppend,
      cdroms: [{id: 'cd0'}],
    });
  }
  if (d.state === 'paused') d = await expect(200, 'POST', '/v1/domains/vm1/resume');
  return booted(d);
}

async function paused() {
  const d = await running();
  if (d.state !== 'paused') await expect(200, 'POST', '/v1/domains/vm1/pause');
}

async function gone() {
  if (await vm1()) await expect(200, 'DELETE', '/v1/domains/vm1');
}

const has = (d, kind, id) => d.devices[kind].some((x) => x.id === id);

async function disk(present) {
  const d = await running();
  if (present && !has(d, 'disks', 'd1')) {
    await expect(201, 'POST', '/v1/domains/vm1/disks',
        {id: 'd1', path: `${images}/d1.img`, format: 'raw', bus: 'virtio'});
  }
  if (!present && has(d, 'disks', 'd1')) await expect(200, 'DELETE', '/v1/domains/vm1/disks/d1');
}

async function nic(present) {
  const d = await running();
  if (present && !has(d, 'nics', 'n0')) {
    await expect(201, 'POST', '/v1/domains/vm1/nics', {id: 'n0', tap: kTap});
  }
  if (!present && has(d, 'nics', 'n0')) await expect(200, 'DELETE', '/v1/domains/vm1/nics/n0');
}

async function medium() {
  const d = await running();
  if (!d.devices.cdroms.some((c) => c.id === 'cd0' && c.medium)) {
    await expect(200, 'PUT', '/v1/domains/vm1/cdroms/cd0/medium', {path: `${images}/x.iso`});
  }
}

async function vnc() {
  const d = await running();
  if (!d.devices.vnc) await expect(200, 'PUT', '/v1/domains/vm1/vnc', {listen: '127.0.0.1:0'});
}

// What each operation's success needs.
const kSuccess = {
  'GET /v1/version': async () => {},
  'GET /v1/domains': async () => {},
  'POST /v1/domains': gone,
  'GET /v1/domains/{name}': running,
  'DELETE /v1/domains/{name}': running,
  'POST /v1/domains/{name}/pause': running,
  'POST /v1/domains/{name}/resume': paused,
  'POST /v1/domains/{name}/shutdown': running,
  'POST /v1/domains/{name}/reset': running,
  'PUT /v1/domains/{name}/cdroms/{id}/medium': running,
  'DELETE /v1/domains/{name}/cdroms/{id}/medium': medium,
  'POST /v1/domains/{name}/disks': () => disk(false),
  'DELETE /v1/domains/{name}/disks/{id}': () => disk(true),
  'POST /v1/domains/{name}/nics': () => nic(false),
  'DELETE /v1/domains/{name}/nics/{id}': () => nic(true),
  'PUT /v1/domains/{name}/vnc': running,
  'DELETE /v1/domains/{name}/vnc': vnc,
  'POST /v1/domains/{name}/qmp': running,
  'GET /metrics': async () => {},
  // The broker runs with --pool: the view holds a shape, and its QEMU once spawned.
  'GET /v1/pool': async () => {},
};

// Successes that need a second broker: tests/api/migrate_test.cpp proves them with a real guest.
const kLeftToMigration = new Set([
  'POST /v1/domains/{name}/migrate',
  'POST /v1/migrations',
]);

// Successes that need what this run does not set up (a save root, a save in progress): they are
// proved against the real guest by tests/flows/save_test.cpp.
const kLeftToFlows = new Set([
  'POST /v1/domains/restore',
  'POST /v1/domains/{name}/save',
  'DELETE /v1/domains/{name}/job',
]);

// Successes that need a Xen host: tests/xen/xen_host_test.cpp proves the view
// (xen::to_json) against the fake xenstored; a broker without --xen answers 404.
const kLeftToXen = new Set(['GET /v1/xen']);

// What brings about a conflict, by operation.
const kConflict = {
  'POST /v1/domains': running,  // already_exists
  'POST /v1/domains/{name}/pause': paused,  // wrong_state
  'POST /v1/domains/{name}/disks': () => disk(true),  // already_exists
  'POST /v1/domains/{name}/nics': () => nic(true),  // already_exists
};

function set_path(t, path) {
  t.fullPath = path;
  t.request.uri = path;
}

function set_body(t, body, type) {
  t.request.body = body;
  t.request.headers['Content-Type'] = type;
  t.request.headers['Content-Length'] = Buffer.byteLength(body);
}

// dredd reads an operation's `default` response as one more 200: a second transaction of the
// same name as the documented 200, or one with a 200 the operation does not document.
const seen = new Set();
function from_default(t) {
  if (!String(t.expected.statusCode).startsWith('2')) return false;
  if (!(String(t.expected.statusCode) in operation(t).responses)) return true;
  if (seen.has(t.name)) return true;
  seen.add(t.name);
  return false;
}

function operation(t) {
  return doc.paths[t.origin.resourceName][t.request.method.toLowerCase()];
}

// The node a {$ref: "#/a/b"} names, or `node`.
function resolve(node) {
  while (node && typeof node === 'object' && typeof node.$ref === 'string') {
    node = node.$ref.slice(2).split('/').reduce(
        (at, key) => at[key.replace(/~1/g, '/').replace(/~0/g, '~')], doc);
  }
  return node;
}

// An OpenAPI 3.0 schema as the JSON Schema (draft 4) it stands for: references inlined, and
// `nullable` as a null alternative. dredd's own reading of docs/api.yaml drops minimum, pattern,
// allOf, nullable and more, and takes every property for a required one.
function json_schema(node) {
  node = resolve(node);
  if (Array.isArray(node)) return node.map(json_schema);
  if (node === null || typeof node !== 'object') return node;
  const out = {};
  for (const [key, value] of Object.entries(node)) {
    if (['nullable', 'example', 'description'].includes(key) || key.startsWith('x-')) continue;
    if (key === 'properties') {
      out.properties = Object.fromEntries(
          Object.entries(value).map(([name, schema]) => [name, json_schema(schema)]));
      continue;
    }
    out[key] = json_schema(value);
  }
  return node.nullable ? {anyOf: [{type: 'null'}, out]} : out;
}

// Checks the body against the schema docs/api.yaml gives the response, not dredd's reading of it.
function use_documented_schema(t) {
  const response = resolve(operation(t).responses[String(t.expected.statusCode)]);
  const schema = response && response.content && response.content['application/json'] &&
      response.content['application/json'].schema;
  if (!schema) return;
  t.expected.bodySchema =
      JSON.stringify({$schema: 'http://json-schema.org/draft-04/schema#', ...json_schema(schema)});
}

// Prepares `t`, or skips it; the returned reason is why it is skipped.
async function prepare(t) {
  const op = `${t.request.method} ${t.origin.resourceName}`;
  const status = String(t.expected.statusCode);
  if (t.request.body) set_body(t, local(t.request.body), t.request.headers['Content-Type']);
  if (op === 'GET /v1/events') return 'the event stream does not end';
  if (op === 'GET /metrics' && status === '200' && t.name.endsWith('> application/json')) {
    return 'the metrics are text: dredd pairs the 200 with the JSON of the error responses';
  }
  if (from_default(t)) return 'the default response';
  if (status.startsWith('2')) {
    if (kLeftToMigration.has(op)) return 'needs a second broker: left to the migration tests';
    if (kLeftToFlows.has(op)) return 'needs a save root or a running save: left to the flow tests';
    if (kLeftToXen.has(op)) return 'needs a Xen host: left to the Xen tests';
    if (op === 'POST /v1/domains') {
      // The guest's own command line: it boots in 2-3 s with it.
      const body = {...JSON.parse(t.request.body), append: kAppend};
      set_body(t, JSON.stringify(body), 'application/json');
    }
    await kSuccess[op]();
    return null;
  }
  switch (status) {
    case '400':
      set_path(t, t.fullPath + (t.fullPath.includes('?') ? '&' : '?') + 'bogus=1');
      return null;
    case '404':
      if (op === 'POST /v1/domains') {
        await gone();
        const body = {...JSON.parse(t.request.body), kernel: `${images}/no-such-kernel`};
        set_body(t, JSON.stringify(body), 'application/json');
        return null;
      }
      if (op === 'POST /v1/domains/restore') return 'a missing saved disk needs a save root';
      if (op === 'POST /v1/migrations') return 'a missing disk needs a described domain: left to the migration tests';
      set_path(t, t.fullPath.replace('/v1/domains/vm1', '/v1/domains/nope'));
      return null;
    case '409':
      if (!kConflict[op]) return 'no conflict set up for this operation';
      await kConflict[op]();
      return null;
    case '415':
      set_body(t, '{}', 'text/plain');
      return null;
    case '501':
      await running();
      return null;
    case '502':
      if (op !== 'POST /v1/domains/{name}/qmp') return 'QEMU refuses only what it is sent';
      await running();
      set_body(t, JSON.stringify({execute: 'no-such-command'}), 'application/json');
      return null;
    default:
      return 'left to the server and flow tests';
  }
}

// The metrics page is Prometheus text whose values change with every request: dredd would
// compare it to the example verbatim. Its status and Content-Type are checked here;
// tests/api/metrics_test.cpp checks the text itself with promtool.
hooks.beforeEachValidation((t) => {
  if (`${t.request.method} ${t.origin.resourceName}` !== 'GET /metrics') return;
  if (t.real && t.real.statusCode === 200) t.expected.body = t.real.body;
});

hooks.beforeEach((t, done) => {
  prepare(t).then((skipped) => {
    t.skip = skipped !== null;
    if (t.skip) hooks.log(`skip ${t.name}: ${skipped}`);
    else use_documented_schema(t);
    done();
  }, (e) => {
    t.skip = false;
    t.fail = `setting up: ${e.message}`;
    done();
  });
});

hooks.afterAll((transactions, done) => {
  gone().then(() => done(), () => done());
});
