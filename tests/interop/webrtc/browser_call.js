// Two web phones (phone.html) in headless Chromium call each other through a running moonroute
// over wss (issue 21): run by `.ci/interop browser`.
//
//   node browser_call.js --server wss://127.0.0.1:PORT --domain 127.0.0.1[:PORT]
//        (--cert CERT.pem --key KEY.pem --page-port PORT | --page URL)
//        [--chromium /usr/bin/chromium] [--screenshot target/interop/ws-call.png] [--log-dir DIR]
//
// serve.js serves the page over HTTPS on 127.0.0.1:--page-port with the server's certificate
// (moonroute's [websocket] allowed_origins must list https://127.0.0.1:PORT), or --page names
// the page already served (.ci/webphone: the serve.js command of docs/webphone.md). One Chromium
// (--headless=new, fake microphone and camera, the permission prompt granted, the self-signed
// certificate accepted) opens two tabs: bob's phone (answers at once) and alice's. Steps, one
// PASS/FAIL line each:
//   1. both register (JsSIP answers moonroute's digest challenge);
//   2. alice calls bob: both reach "established" (INVITE, 200, ACK through moonroute);
//   3. audio flows peer to peer: getStats shows audio sent and received (inbound-rtp: 25
//      packets at least) in both tabs, the selected ICE pair printed; a screenshot of alice's
//      page is saved (bob's next to it, -callee.png);
//   4. alice hangs up: both see the call end, bob by alice's BYE.
// Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no
// debugging port any local process could reach, no port to clash. Every wait is on an event
// of the page or the browser, bounded by a deadline; only the audio counters are sampled
// (getStats has no event), every 250 ms up to a deadline. Exit status 1 when a step failed.
'use strict';

const { spawn } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { servePhone } = require('./serve');
const { Steps, within, arg } = require('./steps');

const WAIT_MS = 15000;
const MIN_PACKETS = 25;
const SERVER = arg('server');
const DOMAIN = arg('domain');
const CHROMIUM = arg('chromium', '/usr/bin/chromium');
const SCREENSHOT = arg('screenshot', 'target/interop/ws-call.png');
const LOG_DIR = arg('log-dir', '');

/** The DevTools protocol over Chromium's pipe: NUL-terminated JSON messages on fds 3 and 4. */
class DevTools {
  constructor(browser) {
    this.nextId = 1;
    this.pending = new Map();
    this.handlers = [];
    this.closed = new Promise((resolve) =>
      browser.once('exit', (code, signal) => resolve(`chromium exited (${signal || code})`)),
    );
    this.out = browser.stdio[3];
    let buffered = '';
    browser.stdio[4].on('data', (chunk) => {
      buffered += chunk.toString();
      let end;
      while ((end = buffered.indexOf('\0')) >= 0) {
        this.dispatch(JSON.parse(buffered.slice(0, end)));
        buffered = buffered.slice(end + 1);
      }
    });
  }

  dispatch(message) {
    if (message.id !== undefined) {
      const call = this.pending.get(message.id);
      this.pending.delete(message.id);
      if (!call) return;
      if (message.error) call.reject(new Error(`${call.method}: ${message.error.message}`));
      else call.resolve(message.result);
      return;
    }
    for (const handler of this.handlers) handler(message);
  }

  /** One command; `sessionId` addresses a tab attached with flatten. */
  send(method, params = {}, sessionId) {
    const id = this.nextId++;
    const message = { id, method, params };
    if (sessionId) message.sessionId = sessionId;
    const answer = new Promise((resolve, reject) =>
      this.pending.set(id, { method, resolve, reject }),
    );
    this.out.write(`${JSON.stringify(message)}\0`);
    return Promise.race([
      answer,
      this.closed.then((why) => Promise.reject(new Error(`${method}: ${why}`))),
    ]);
  }

  on(handler) {
    this.handlers.push(handler);
  }
}

/** One tab: a target attached with its own session, its console written to `logFile`. */
class Tab {
  static async open(devtools, name, logFile) {
    const { targetId } = await devtools.send('Target.createTarget', {
      url: 'about:blank',
      newWindow: true,
    });
    const { sessionId } = await devtools.send('Target.attachToTarget', { targetId, flatten: true });
    const tab = new Tab(devtools, name, sessionId, logFile);
    devtools.on((m) => m.sessionId === sessionId && tab.event(m));
    await devtools.send('Runtime.enable', {}, sessionId);
    await devtools.send('Page.enable', {}, sessionId);
    return tab;
  }

  constructor(devtools, name, sessionId, logFile) {
    this.devtools = devtools;
    this.name = name;
    this.sessionId = sessionId;
    this.log = logFile ? fs.createWriteStream(logFile) : null;
    this.loaded = null;
  }

  event({ method, params }) {
    if (method === 'Runtime.consoleAPICalled' && this.log) {
      const text = params.args
        .map((a) => (a.value !== undefined ? a.value : a.description))
        .join(' ');
      this.log.write(`${params.type}: ${text}\n`);
    } else if (method === 'Runtime.exceptionThrown') {
      const d = params.exceptionDetails;
      const text = `${this.name}'s page threw: ${d.exception ? d.exception.description : d.text}`;
      if (this.log) this.log.write(`${text}\n`);
      console.log(`     ${text.split('\n')[0]}`);
    } else if (method === 'Page.loadEventFired' && this.loaded) {
      this.loaded();
    }
  }

  async navigate(url) {
    const loaded = new Promise((resolve) => (this.loaded = resolve));
    const { errorText } = await this.devtools.send('Page.navigate', { url }, this.sessionId);
    if (errorText) throw new Error(`${this.name}'s page did not load: ${errorText}`);
    await within(WAIT_MS, `${this.name}'s page to load`, loaded);
  }

  /** The value of `expression` (awaited when a promise) in the page; its exception rethrown. */
  async eval(expression) {
    const { result, exceptionDetails } = await this.devtools.send(
      'Runtime.evaluate',
      { expression, awaitPromise: true, returnByValue: true },
      this.sessionId,
    );
    if (exceptionDetails) {
      throw new Error(
        `${this.name}: ${expression}: ${exceptionDetails.exception ? exceptionDetails.exception.description : exceptionDetails.text}`,
      );
    }
    return result.value;
  }

  /** Resolves once the phone's state is one of `states`, with a FAIL-worthy reason if not `want`. */
  async until(want, states, what) {
    const list = JSON.stringify(states);
    const state = await within(WAIT_MS, `${this.name}: ${what}`, this.eval(`phone.until(${list})`));
    if (state !== want)
      throw new Error(
        `${this.name}: ${await this.eval('document.getElementById("status").textContent')}`,
      );
  }

  async screenshot(file) {
    const { data } = await this.devtools.send(
      'Page.captureScreenshot',
      { format: 'png' },
      this.sessionId,
    );
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, Buffer.from(data, 'base64'));
  }
}

function launchChromium(profile) {
  const flags = [
    '--headless=new',
    '--remote-debugging-pipe',
    `--user-data-dir=${profile}`,
    '--no-first-run',
    '--no-default-browser-check',
    '--use-fake-device-for-media-stream',
    '--use-fake-ui-for-media-stream',
    '--ignore-certificate-errors',
    '--autoplay-policy=no-user-gesture-required',
    '--disable-background-timer-throttling',
    '--disable-renderer-backgrounding',
    '--disable-backgrounding-occluded-windows',
    '--mute-audio',
    '--allow-loopback-in-peer-connection',
    '--window-size=900,800',
  ];
  // Chromium's sandbox refuses to run as root (CI containers).
  if (process.getuid && process.getuid() === 0) flags.push('--no-sandbox');
  const browser = spawn(CHROMIUM, [...flags, 'about:blank'], {
    stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'],
  });
  const log = LOG_DIR ? fs.createWriteStream(path.join(LOG_DIR, 'chromium.log')) : null;
  browser.stderr.on('data', (chunk) => log && log.write(chunk));
  return browser;
}

/**
 * The tab's audio counters once it sent audio and received MIN_PACKETS packets (half a second of
 * 20 ms frames), sampled every 250 ms.
 */
async function audioFlows(tab) {
  const deadline = Date.now() + WAIT_MS;
  let bytes;
  for (;;) {
    bytes = await tab.eval('phone.audioBytes()');
    if (bytes.sent > 0 && bytes.packetsReceived >= MIN_PACKETS) return bytes;
    if (Date.now() > deadline) {
      throw new Error(
        `${tab.name}: no audio both ways after ${WAIT_MS / 1000}s (sent ${bytes.sent} bytes, received ${bytes.received} in ${bytes.packetsReceived} packets; want ${MIN_PACKETS})`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function scenario(steps, page) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'moonroute-chromium-'));
  const browser = launchChromium(profile);
  const devtools = new DevTools(browser);
  const exited = devtools.closed;
  const tabs = [];
  try {
    const version = await steps.step('headless Chromium starts', async () => {
      const { product } = await within(
        WAIT_MS,
        'Chromium on its DevTools pipe',
        devtools.send('Browser.getVersion'),
      );
      return product;
    });
    const open = async (user, extra) => {
      const tab = await Tab.open(
        devtools,
        user,
        LOG_DIR ? path.join(LOG_DIR, `browser-${user}.console`) : null,
      );
      tabs.push(tab);
      const query = new URLSearchParams({
        server: SERVER,
        user,
        domain: DOMAIN,
        password: `${user}-pw`,
        register: '1',
        debug: '1',
        ice: 'loopback',
        ...extra,
      });
      await tab.navigate(`${page}?${query}`);
      return tab;
    };
    let alice;
    let bob;
    await steps.step(`bob's and alice's phones register over ${SERVER} (digest auth)`, async () => {
      bob = await open('bob', { autoanswer: '1' });
      alice = await open('alice', { target: 'bob' });
      await Promise.all([
        bob.until('registered', ['registered', 'registration failed'], 'registered'),
        alice.until('registered', ['registered', 'registration failed'], 'registered'),
      ]);
      return `${version}, page ${page}`;
    });
    await steps.step(
      'alice calls bob, bob answers: the call is established in both tabs',
      async () => {
        await alice.eval('phone.call("bob")');
        await Promise.all([
          alice.until('established', ['established', 'failed', 'ended'], 'the call established'),
          bob.until('established', ['established', 'failed', 'ended'], 'the call established'),
        ]);
      },
    );
    await steps.step(
      'audio flows peer to peer (getStats: audio bytes both ways in both tabs)',
      async () => {
        const [a, b] = await Promise.all([audioFlows(alice), audioFlows(bob)]);
        await alice.screenshot(SCREENSHOT);
        await bob.screenshot(SCREENSHOT.replace(/(\.png)?$/, '-callee.png'));
        console.log(`     media path (alice's view): ${a.path}`);
        return `alice sent ${a.sent} B, received ${a.received} B in ${a.packetsReceived} packets; bob sent ${b.sent} B, received ${b.received} B in ${b.packetsReceived} packets; screenshot ${SCREENSHOT}`;
      },
    );
    await steps.step('alice hangs up: both calls end (BYE through moonroute)', async () => {
      await alice.eval('phone.hangup()');
      await Promise.all([
        alice.until('ended', ['ended', 'failed'], 'the call ended'),
        bob.until('ended', ['ended', 'failed'], 'the call ended'),
      ]);
      const status = await bob.eval('document.getElementById("status").textContent');
      if (!/remote hung up/.test(status)) throw new Error(`bob: ${status} (want the remote's BYE)`);
      return `bob: ${status}`;
    });
  } catch {
    // The FAIL line is printed; the scenario stops here.
  } finally {
    for (const tab of tabs) {
      if (LOG_DIR) {
        const events = await within(
          2000,
          'the page log',
          tab.eval('phone.events.join("\\n")'),
        ).catch(() => '');
        fs.writeFileSync(path.join(LOG_DIR, `browser-${tab.name}.events`), `${events}\n`);
      }
    }
    await within(
      5000,
      'Chromium to close',
      devtools.send('Browser.close').then(() => exited),
    ).catch(() => browser.kill('SIGKILL'));
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

(async () => {
  const steps = new Steps('browser');
  let pageServer;
  try {
    const given = arg('page', '');
    const page =
      given ||
      (await steps.step('the web phone is served over https', async () => {
        const s = await servePhone({ port: arg('page-port'), cert: arg('cert'), key: arg('key') });
        pageServer = s.server;
        return s.url;
      }));
    await scenario(steps, page);
  } catch {
    // printed
  } finally {
    if (pageServer) pageServer.close();
  }
  process.exit(steps.failed === 0 ? 0 : 1);
})();
