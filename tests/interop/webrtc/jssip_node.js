// JsSIP on Node against a running moonroute (issue 21): run by `.ci/interop jssip`.
//
//   node jssip_node.js --ws ws://127.0.0.1:PORT --wss wss://127.0.0.1:PORT --ca CERT.pem
//                      [--domain 127.0.0.1] [--trace-dir DIR]
//
// For each of ws: and wss: (RFC 7118), two JsSIP user agents, alice and bob (passwords
// alice-pw and bob-pw, provisioned by `moonroute ctl user add`), each on its own WebSocket
// connection:
//   1. register with digest authentication (the 401 challenge of scripts/default.lua answered);
//   2. alice sends bob a MESSAGE: bob receives it, alice gets 200;
//   3. alice INVITEs bob, bob answers (signalling only: Node has no WebRTC, so a stand-in
//      RTCPeerConnection offers and answers a fixed SDP): both see the call confirmed, bob's
//      INVITE carries moonroute's Via (WS/WSS) and Record-Route (transport=ws);
//   4. alice hangs up: bob receives the BYE, both see the call end;
//   5. both unregister.
// One PASS or FAIL line per step; exit status 1 when any step failed. Every wait is on a JsSIP
// event, bounded by a deadline. wss: verifies the server's certificate against --ca (the
// self-signed certificate the caller made), so no certificate check is switched off.
// Each agent's SIP traffic goes to DIR/jssip-<transport>-<user>.trace (with --trace-dir).
'use strict';

const fs = require('fs');
const path = require('path');
const WebSocket = require('ws');
const JsSIP = require('jssip');
const { Steps, within, once, arg } = require('./steps');

const WAIT_MS = 10000;
const DOMAIN = arg('domain', '127.0.0.1');
const TRACE_DIR = arg('trace-dir', '');
const CA = fs.readFileSync(arg('ca'));
const PASSWORDS = { alice: 'alice-pw', bob: 'bob-pw' };

// JsSIP's WebSocketInterface opens `new WebSocket(url, 'sip')` as in a browser: here the ws
// package's, trusting the test's CA for wss:.
globalThis.WebSocket = class extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols, { ca: CA });
  }
};

/**
 * Stands in for the browser's RTCPeerConnection: JsSIP needs one to build its offer and answer;
 * the SIP signalling through moonroute is what this test checks, not media.
 */
class SignallingOnlyPeerConnection extends EventTarget {
  constructor() {
    super();
    this.iceGatheringState = 'complete';
    this.iceConnectionState = 'new';
    this.signalingState = 'stable';
    this.localDescription = null;
    this.remoteDescription = null;
  }

  static sdp() {
    const id = Math.floor(Math.random() * 1e9);
    return [
      'v=0',
      `o=- ${id} 1 IN IP4 127.0.0.1`,
      's=-',
      'c=IN IP4 127.0.0.1',
      't=0 0',
      'm=audio 9 RTP/AVP 0',
      'a=rtpmap:0 PCMU/8000',
      'a=sendrecv',
      '',
    ].join('\r\n');
  }

  async createOffer() {
    return { type: 'offer', sdp: SignallingOnlyPeerConnection.sdp() };
  }

  async createAnswer() {
    return { type: 'answer', sdp: SignallingOnlyPeerConnection.sdp() };
  }

  async setLocalDescription(description) {
    this.localDescription = description;
    this.signalingState = description.type === 'offer' ? 'have-local-offer' : 'stable';
  }

  async setRemoteDescription(description) {
    this.remoteDescription = description;
    this.signalingState = description.type === 'offer' ? 'have-remote-offer' : 'stable';
  }

  getSenders() {
    return [];
  }

  getReceivers() {
    return [];
  }

  close() {
    this.signalingState = 'closed';
  }
}
globalThis.window = globalThis;
globalThis.RTCPeerConnection = SignallingOnlyPeerConnection;
globalThis.RTCSessionDescription = class {
  constructor({ type, sdp }) {
    this.type = type;
    this.sdp = sdp;
  }
};

/** JsSIP's WebSocket socket, keeping what it received (and a trace file of both ways). */
class TracedSocket extends JsSIP.WebSocketInterface {
  constructor(url, traceFile) {
    super(url);
    this.received = [];
    this.trace = traceFile ? fs.createWriteStream(traceFile) : null;
  }

  send(message) {
    if (this.trace) this.trace.write(`---- sent ${new Date().toISOString()}\n${message}\n`);
    return super.send(message);
  }

  _onMessage(event) {
    const text = typeof event.data === 'string' ? event.data : Buffer.from(event.data).toString();
    this.received.push(text);
    if (this.trace) this.trace.write(`---- received ${new Date().toISOString()}\n${text}\n`);
    super._onMessage(event);
  }

  /** Whether a `code` response to `method` arrived. */
  got(code, method) {
    const cseq = new RegExp(`^CSeq:\\s*\\d+\\s+${method}\\s*$`, 'im');
    return this.received.some((m) => m.startsWith(`SIP/2.0 ${code} `) && cseq.test(m));
  }
}

function userAgent(name, url, transport) {
  const trace = TRACE_DIR ? path.join(TRACE_DIR, `jssip-${transport}-${name}.trace`) : null;
  const socket = new TracedSocket(url, trace);
  const ua = new JsSIP.UA({
    sockets: [socket],
    uri: `sip:${name}@${DOMAIN}`,
    password: PASSWORDS[name],
    display_name: name,
    register: false,
    user_agent: `JsSIP ${JsSIP.version} (moonroute interop)`,
  });
  return { name, ua, socket };
}

/** `ua.start()`, resolved on the WebSocket's opening. */
async function connect(agent) {
  const connected = once(agent.ua, 'connected', ['disconnected']);
  agent.ua.start();
  await within(WAIT_MS, `${agent.name}'s WebSocket connection`, connected);
}

async function register(agent) {
  const registered = once(agent.ua, 'registered', ['registrationFailed']);
  agent.ua.register();
  const { response } = await within(WAIT_MS, `${agent.name}'s 200 to REGISTER`, registered);
  if (!agent.socket.got(401, 'REGISTER'))
    throw new Error('registered without a 401 digest challenge');
  return `401 challenge answered, 200 with Contact expires=${response.getHeader('Contact').match(/expires=(\d+)/i)?.[1] ?? '?'}`;
}

async function message(from, to) {
  const body = `hello ${to.name}, this is ${from.name} (${Date.now()})`;
  const delivered = new Promise((resolve) => {
    const onMessage = (e) => {
      if (e.originator !== 'remote' || e.request.body !== body) return;
      to.ua.removeListener('newMessage', onMessage);
      resolve(e.request);
    };
    to.ua.on('newMessage', onMessage);
  });
  const answered = new Promise((resolve, reject) => {
    from.ua.sendMessage(`sip:${to.name}@${DOMAIN}`, body, {
      eventHandlers: {
        succeeded: (e) => resolve(e.response),
        failed: (e) =>
          reject(
            new Error(
              `MESSAGE failed: ${e.cause}${e.response ? ` (${e.response.status_code} ${e.response.reason_phrase})` : ''}`,
            ),
          ),
      },
    });
  });
  const [response] = await within(
    WAIT_MS,
    `the MESSAGE at ${to.name} and its 200 at ${from.name}`,
    Promise.all([answered, delivered]),
  );
  const challenged = from.socket.got(407, 'MESSAGE') ? '407 challenge answered, ' : '';
  return `${challenged}${response.status_code} ${response.reason_phrase}, body delivered`;
}

/** alice calls bob, who answers; resolves with both sessions once each saw the call confirmed. */
async function call(caller, callee, transport) {
  const media = { mediaConstraints: { audio: false, video: false } };
  const incoming = new Promise((resolve) => {
    const onSession = (e) => {
      if (e.originator !== 'remote') return;
      callee.ua.removeListener('newRTCSession', onSession);
      resolve({
        session: e.session,
        request: e.request,
        confirmed: once(e.session, 'confirmed', ['failed', 'ended']),
      });
      e.session.answer(media);
    };
    callee.ua.on('newRTCSession', onSession);
  });
  const session = caller.ua.call(`sip:${callee.name}@${DOMAIN}`, media);
  const confirmed = once(session, 'confirmed', ['failed', 'ended']);
  const remote = await within(WAIT_MS, `the INVITE at ${callee.name}`, incoming);
  await within(WAIT_MS, `${caller.name}'s call confirmed (200 and ACK)`, confirmed);
  await within(WAIT_MS, `the ACK at ${callee.name}`, remote.confirmed);

  const via = remote.request.getHeader('Via');
  const recordRoute = remote.request.getHeader('Record-Route') || '';
  const wantVia = `SIP/2.0/${transport.toUpperCase()}`;
  if (!via.toUpperCase().startsWith(wantVia))
    throw new Error(`the INVITE's top Via is "${via}" (want ${wantVia} of moonroute)`);
  if (!/transport=ws/i.test(recordRoute))
    throw new Error(`the INVITE's Record-Route is "${recordRoute}" (want transport=ws)`);
  const challenged = caller.socket.got(407, 'INVITE') ? '407 challenge answered; ' : '';
  return {
    session,
    remote: remote.session,
    detail: `${challenged}Via ${via.split(';')[0]}, Record-Route ${recordRoute}`,
  };
}

async function hangUp(caller, callee, sessions) {
  const calleeEnded = once(sessions.remote, 'ended', ['failed']);
  const callerEnded = once(sessions.session, 'ended', ['failed']);
  sessions.session.terminate();
  const [atCallee] = await within(
    WAIT_MS,
    `the BYE at ${callee.name} and its 200 at ${caller.name}`,
    Promise.all([calleeEnded, callerEnded]),
  );
  if (atCallee.originator !== 'remote')
    throw new Error(`bob's call ended by ${atCallee.originator} (want the remote's BYE)`);
  return `${callee.name}'s call ended by the remote BYE (${atCallee.cause})`;
}

async function unregister(agent) {
  const done = once(agent.ua, 'unregistered', ['registrationFailed']);
  agent.ua.unregister();
  const { response } = await within(WAIT_MS, `${agent.name}'s 200 to REGISTER Expires 0`, done);
  return `${response.status_code} ${response.reason_phrase}`;
}

async function round(transport, url) {
  const steps = new Steps(`jssip ${transport}`);
  const alice = userAgent('alice', url, transport);
  const bob = userAgent('bob', url, transport);
  try {
    await steps.step(`alice and bob connect to ${url}`, async () => {
      await Promise.all([connect(alice), connect(bob)]);
    });
    await steps.step('alice registers (digest auth)', () => register(alice));
    await steps.step('bob registers (digest auth)', () => register(bob));
    await steps.step('alice sends bob a MESSAGE', () => message(alice, bob));
    let sessions;
    await steps.step('alice calls bob, bob answers', async () => {
      sessions = await call(alice, bob, transport);
      return sessions.detail;
    });
    await steps.step('alice hangs up (BYE)', () => hangUp(alice, bob, sessions));
    await steps.step('alice and bob unregister', async () => {
      const answers = await Promise.all([unregister(alice), unregister(bob)]);
      return answers.join(', ');
    });
  } catch {
    // The FAIL line is printed; the round stops here.
  } finally {
    alice.ua.stop();
    bob.ua.stop();
  }
  return steps.failed === 0;
}

(async () => {
  const results = [await round('ws', arg('ws')), await round('wss', arg('wss'))];
  process.exit(results.every(Boolean) ? 0 : 1);
})();
