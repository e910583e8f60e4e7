// The web phone of phone.html: JsSIP over a WebSocket to moonroute, audio peer to peer.
//
// The form's fields can be preset from the page's query string (server, user, domain,
// password, target, autoanswer=1; register=1 registers at once; debug=1 logs JsSIP's debug
// output to the console; ice=loopback offers loopback ICE candidates only), which is how
// .ci/interop's browser scenario opens two phones. Its state is in `window.phone` for the
// driver:
//   phone.state      'unregistered' | 'registered' | 'registration failed' | 'ringing' |
//                    'calling' | 'established' | 'ended' | 'failed'
//   phone.call(target), phone.answer(), phone.hangup()
//   phone.until(states)  resolves with the state once it is one of `states` (an array)
//   phone.audioBytes()  resolves to { sent, received, packetsReceived, path } from getStats
//                       (outbound-rtp, inbound-rtp of the audio; the selected ICE candidate
//                       pair), the proof that media flows and where.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  for (const field of ['server', 'user', 'domain', 'password', 'target']) {
    if (params.has(field)) $(field).value = params.get(field);
  }
  $('autoanswer').checked = params.get('autoanswer') === '1';

  const phone = { state: 'unregistered', events: [], ua: null, session: null };
  window.phone = phone;
  const waiters = new Set();
  phone.until = (states) =>
    new Promise((resolve) => {
      if (states.includes(phone.state)) resolve(phone.state);
      else waiters.add({ states, resolve });
    });
  if (params.get('debug') === '1') JsSIP.debug.enable('JsSIP:*');

  function log(text) {
    const line = `${new Date().toISOString().slice(11, 23)} ${text}`;
    phone.events.push(line);
    $('log').textContent += `${line}\n`;
  }

  function setState(state, detail) {
    phone.state = state;
    const status = $('status');
    status.textContent = detail ? `${state}: ${detail}` : state;
    status.className =
      state === 'established' ? 'established' : /failed/.test(state) ? 'failed' : '';
    log(status.textContent);
    const inCall = ['ringing', 'calling', 'established'].includes(state);
    $('hangup').disabled = !inCall;
    $('answer').disabled = state !== 'ringing';
    for (const waiter of waiters) {
      if (!waiter.states.includes(state)) continue;
      waiters.delete(waiter);
      waiter.resolve(state);
    }
  }

  function register() {
    if (phone.ua) phone.ua.stop();
    const user = $('user').value.trim();
    const domain = $('domain').value.trim();
    $('who').textContent = `${user}@${domain}`;
    document.title = `${user}: moonroute web phone`;
    const ua = new JsSIP.UA({
      sockets: [new JsSIP.WebSocketInterface($('server').value.trim())],
      uri: `sip:${user}@${domain}`,
      password: $('password').value,
      display_name: user,
      user_agent: `JsSIP ${JsSIP.version} (moonroute web phone)`,
    });
    ua.on('connected', () => log(`connected to ${$('server').value}`));
    ua.on('disconnected', (e) => log(`disconnected${e && e.code ? ` (${e.code})` : ''}`));
    ua.on('registered', () => setState('registered', `${user}@${domain}`));
    ua.on('unregistered', () => setState('unregistered'));
    ua.on('registrationFailed', (e) => setState('registration failed', e.cause));
    ua.on('newRTCSession', (e) => track(e.session, e.originator));
    phone.ua = ua;
    ua.start();
  }

  // The call's media: the remote audio plays in the <audio> element.
  function attachRemoteAudio(session) {
    session.connection.addEventListener('track', (e) => {
      $('remote').srcObject = e.streams[0];
    });
  }

  // ice=loopback (tests on a box whose only allowed network is 127.0.0.0/8 and ::1): offer and
  // answer only the loopback ICE candidates, which Chromium gathers with
  // --allow-loopback-in-peer-connection, so media never uses another interface.
  const loopbackOnly = params.get('ice') === 'loopback';
  function loopbackCandidates(sdp) {
    return sdp
      .split('\r\n')
      .filter(
        (line) =>
          !line.startsWith('a=candidate:') || / (127\.\d+\.\d+\.\d+|::1) \d+ typ /.test(line),
      )
      .join('\r\n');
  }

  function track(session, originator) {
    if (phone.session && !phone.session.isEnded()) {
      session.terminate({ status_code: 486 });
      return;
    }
    phone.session = session;
    const peer = session.remote_identity.uri.user;
    session.on('peerconnection', () => attachRemoteAudio(session));
    if (loopbackOnly)
      session.on('sdp', (e) => e.originator === 'local' && (e.sdp = loopbackCandidates(e.sdp)));
    if (session.connection) attachRemoteAudio(session);
    session.on('progress', () => originator === 'local' && setState('calling', `${peer} rings`));
    session.on('confirmed', () => setState('established', `with ${peer}`));
    session.on('ended', (e) => setState('ended', `${e.originator} hung up (${e.cause})`));
    session.on('failed', (e) => setState('failed', e.cause));
    if (originator === 'local') {
      setState('calling', peer);
    } else {
      setState('ringing', `${peer} calls`);
      if ($('autoanswer').checked) phone.answer();
    }
  }

  const media = { mediaConstraints: { audio: true, video: false } };
  phone.call = (target) => {
    const to = target || $('target').value.trim();
    phone.ua.call(
      to.includes('@') ? `sip:${to.replace(/^sip:/, '')}` : `sip:${to}@${$('domain').value.trim()}`,
      media,
    );
  };
  phone.answer = () => phone.session && phone.session.answer(media);
  phone.hangup = () => phone.session && !phone.session.isEnded() && phone.session.terminate();

  phone.audioBytes = async () => {
    const pc = phone.session && phone.session.connection;
    const bytes = { sent: 0, received: 0, packetsReceived: 0, path: '' };
    if (!pc) return bytes;
    const stats = await pc.getStats();
    let pair;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId)
        pair = stats.get(s.selectedCandidatePairId);
      if (s.kind !== 'audio') return;
      if (s.type === 'inbound-rtp') {
        bytes.received += s.bytesReceived || 0;
        bytes.packetsReceived += s.packetsReceived || 0;
      }
      if (s.type === 'outbound-rtp') bytes.sent += s.bytesSent || 0;
    });
    if (pair) {
      const end = (id) => {
        const c = stats.get(id);
        return c ? `${c.address}:${c.port} (${c.candidateType})` : '?';
      };
      bytes.path = `${end(pair.localCandidateId)} <-> ${end(pair.remoteCandidateId)}`;
    }
    $('sent').textContent = bytes.sent;
    $('received').textContent = `${bytes.received} (${bytes.packetsReceived} packets)`;
    $('path').textContent = bytes.path || 'none yet';
    return bytes;
  };
  setInterval(() => phone.state === 'established' && phone.audioBytes(), 1000);

  $('account').addEventListener('submit', (e) => {
    e.preventDefault();
    register();
  });
  $('dial').addEventListener('submit', (e) => {
    e.preventDefault();
    phone.call();
  });
  $('answer').addEventListener('click', () => phone.answer());
  $('hangup').addEventListener('click', () => phone.hangup());
  if (params.get('register') === '1') register();
})();
