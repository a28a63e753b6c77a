/* Sautikit browser phone: a minimal JsSIP softphone (the page) and window.sautiPhone (the API
 * the tests drive). Served by the gateway's demo routes next to ./jssip.js.
 *
 * Open /demo/phone?token=...&endpoint=ws://...&uri=sip:alice@... (or put the JSON the
 * token mint returns in the URL hash: /demo/phone#{"token":...,"endpoint":...,"sipProfile":{...}})
 * and the page registers; type a number and press Call, or answer an incoming call.
 *
 * Every sautiPhone method returns a Promise (see the README's browser section):
 *   register({token, endpoint, uri, displayName, expires, authorizationUser})
 *       -> {ok: true, code: 200, expires, rtt_ms} | {ok: false, code, reason}
 *   setToken(token), refresh(token?) -> {ok, code, reason, expires, rtt_ms}
 *   call(target, {headers, codecs}) -> {ok: true} | {ok: false, code, reason}
 *   autoAnswer(on), incoming() -> {ok: true, from} | {ok: false, code, reason}
 *   answer(), hangup(), unregister(), stop() (all three + close the socket), ended() -> {cause, originator}
 *   state() -> {registered, inCall, events},
 *   timings() -> {invite_ms, invite_sent_ms, answered_ms, first_audio_ms} (ms after call())
 *   heard() -> {rate, b64} (Int16 LE mono PCM of the remote audio), clearHeard(), level()
 *   sipLog() -> [{t, dir, line}], debug(on)
 */
(function () {
  'use strict';

  const CAPTURE_MAX_S = 60;           // keep the first 60 s of a session's remote audio
  const FIRST_AUDIO_DBFS = -50;       // timings().first_audio_ms: first block above this
  const HANGUP_WAIT_MS = 5000;
  const UNREGISTER_WAIT_MS = 3000;
  const CONNECT_WAIT_MS = 10000;
  // No echo cancellation / noise suppression / AGC: they reshape a steady test tone (about
  // -14 dB on a -10 dBFS sine) and a softphone on a headset does not need them.
  const MIC = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };

  const $ = (id) => document.getElementById(id);
  const now = () => performance.now();

  // ---- state -------------------------------------------------------------------------------
  let ua = null;
  let token = null;
  let session = null;          // the current (or last) RTCSession
  let autoAnswerOn = false;
  let pendingIncoming = null;  // an incoming session waiting for answer()
  const events = [];
  const sip = [];
  const incomingResults = [];  // outcomes of incoming calls not yet taken by incoming()
  const incomingWaiters = [];
  let lastEnd = null;          // {cause, originator} of the last session
  let endWaiters = [];
  let regResponseWaiters = []; // refresh(): waiting for the next final REGISTER response
  let lastRegisterSent = null;
  let timing = { start: null, inviteSent: null, accepted: null, firstAudio: null };

  function log(type, extra) {
    const e = Object.assign({ t: Math.round(now()), type: type }, extra || {});
    events.push(e);
    if (events.length > 500) events.shift();
    console.log('[sauti] ' + JSON.stringify(e));
    return e;
  }

  function setStatus(text) {
    const el = $('status');
    if (el) el.textContent = text;
  }

  function refreshButtons() {
    const call = $('call'), hang = $('hangup'), ans = $('answer');
    if (!call) return;
    const inCall = !!(session && !session.isEnded());
    call.disabled = !ua || inCall;
    hang.disabled = !inCall;
    ans.disabled = !pendingIncoming;
  }

  // ---- SIP message tap (REGISTER round trips, a log for debugging) --------------------------
  const decoder = new TextDecoder();
  function firstLine(msg) {
    const text = typeof msg === 'string' ? msg : decoder.decode(msg);
    const nl = text.indexOf('\r\n');
    return { text: text, line: nl < 0 ? text : text.slice(0, nl) };
  }

  function tap(dir, msg) {
    const m = firstLine(msg);
    sip.push({ t: Math.round(now()), dir: dir, line: m.line });
    if (sip.length > 500) sip.shift();
    if (dir === 'out' && timing.start !== null && timing.inviteSent === null &&
        m.line.startsWith('INVITE ')) timing.inviteSent = now();
    const cseq = /\r\nCSeq:\s*\d+\s+(\w+)/i.exec(m.text);
    if (!cseq || cseq[1].toUpperCase() !== 'REGISTER') return;
    if (dir === 'out') {
      lastRegisterSent = now();
      return;
    }
    const st = /^SIP\/2\.0\s+(\d{3})\s*(.*)$/.exec(m.line);
    if (!st || Number(st[1]) < 200) return;
    const code = Number(st[1]);
    const rtt = lastRegisterSent === null ? null : now() - lastRegisterSent;
    const res = { ok: code >= 200 && code < 300, code: code, reason: st[2], rtt_ms: rtt,
      expires: code < 300 ? contactExpires(m.text) : null };
    const ws = regResponseWaiters;
    regResponseWaiters = [];
    ws.forEach((w) => w(res));
  }

  // The expires the registrar granted our Contact (its ;expires= or an Expires header), or null.
  function contactExpires(text) {
    const user = ua && ua.contact && ua.contact.uri ? ua.contact.uri.user : null;
    const lines = text.split('\r\n');
    for (const l of lines) {
      if (!/^(Contact|m)\s*:/i.test(l)) continue;
      for (const c of l.replace(/^[^:]*:/, '').split(',')) {
        if (user && c.indexOf(user) < 0) continue;
        const e = /;\s*expires=(\d+)/i.exec(c);
        if (e) return Number(e[1]);
      }
    }
    for (const l of lines) {
      const e = /^Expires\s*:\s*(\d+)/i.exec(l);
      if (e) return Number(e[1]);
    }
    return null;
  }

  class TapSocket extends JsSIP.WebSocketInterface {
    send(message) {
      tap('out', message);
      return super.send(message);
    }
    _onMessage(ev) {
      tap('in', ev.data);
      super._onMessage(ev);
    }
  }

  // ---- capture: remote audio -> <audio> element + WebAudio -> Float32 chunks ----------------
  // Chromium feeds a remote WebRTC track to WebAudio only while a media element plays it.
  let actx = null;
  let capture = { chunks: [], length: 0, source: null, proc: null, stream: null };

  function audioContext() {
    if (!actx) actx = new AudioContext();
    if (actx.state === 'suspended') actx.resume().catch(() => {});
    return actx;
  }

  function stopCapture() {
    if (capture.source) {
      try { capture.source.disconnect(); } catch (e) { /* already */ }
    }
    if (capture.proc) {
      capture.proc.onaudioprocess = null;
      try { capture.proc.disconnect(); } catch (e) { /* already */ }
    }
    capture.source = capture.proc = capture.stream = null;
  }

  function attachRemote(stream) {
    if (capture.stream === stream) return;
    stopCapture();
    const ctx = audioContext();
    const el = $('remote');
    el.srcObject = stream;
    el.play().catch((e) => log('audio_play_error', { reason: String(e) }));
    capture.chunks = [];
    capture.length = 0;
    capture.stream = stream;
    capture.source = ctx.createMediaStreamSource(stream);
    capture.proc = ctx.createScriptProcessor(1024, 1, 1);
    const limit = CAPTURE_MAX_S * ctx.sampleRate;
    const thr = Math.pow(10, FIRST_AUDIO_DBFS / 20);
    capture.proc.onaudioprocess = (ev) => {
      const x = ev.inputBuffer.getChannelData(0);
      if (timing.start !== null && timing.firstAudio === null) {
        // sine-amplitude dBFS (rms * sqrt 2) over 5 ms slices, timed within the block
        const n = Math.max(1, Math.round(ctx.sampleRate * 0.005));
        for (let i = 0; i + n <= x.length; i += n) {
          let s = 0;
          for (let j = i; j < i + n; j++) s += x[j] * x[j];
          if (Math.sqrt(2 * s / n) > thr) {
            // the block started before the call when media was already flowing: clamp
            timing.firstAudio = Math.max(timing.start, now() - (x.length - i) / ctx.sampleRate * 1000);
            log('first_audio', { ms: Math.round(timing.firstAudio - timing.start) });
            break;
          }
        }
      }
      if (capture.length < limit) {
        const take = Math.min(x.length, limit - capture.length);
        capture.chunks.push(x.slice(0, take));
        capture.length += take;
      }
    };
    capture.source.connect(capture.proc);
    capture.proc.connect(ctx.destination);  // a ScriptProcessor runs only when connected; it outputs silence
    log('media', { rate: ctx.sampleRate });
  }

  function hookConnection(pc) {
    if (!pc || pc.__sauti) return;
    pc.__sauti = true;
    pc.addEventListener('track', (ev) => {
      if (ev.track.kind !== 'audio') return;
      attachRemote(ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]));
    });
    pc.addEventListener('iceconnectionstatechange', () =>
      log('ice', { reason: pc.iceConnectionState }));
  }

  function attachFromReceivers(pc) {
    if (!pc || capture.stream) return;
    const tracks = pc.getReceivers().map((r) => r.track).filter((t) => t && t.kind === 'audio');
    if (tracks.length) attachRemote(new MediaStream(tracks));
  }

  function heardPcm() {
    const out = new Int16Array(capture.length);
    let k = 0;
    for (const c of capture.chunks) {
      for (let i = 0; i < c.length; i++) {
        const v = Math.max(-1, Math.min(1, c[i]));
        out[k++] = v < 0 ? v * 32768 : v * 32767;
      }
    }
    const bytes = new Uint8Array(out.buffer);
    let bin = '';
    for (let i = 0; i < bytes.length; i += 0x8000) {
      bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return { rate: actx ? actx.sampleRate : 48000, b64: btoa(bin) };
  }

  // ---- SDP: optionally keep only some audio codecs (e.g. ['PCMU', 'PCMA']) -------------------
  function keepCodecs(sdp, names) {
    const want = names.map((n) => n.toUpperCase()).concat(['TELEPHONE-EVENT']);
    const lines = sdp.split('\r\n');
    const codec = { 0: 'PCMU', 8: 'PCMA' };  // static payload types, in case of no rtpmap
    for (const l of lines) {
      const m = /^a=rtpmap:(\d+)\s+([^/]+)\//.exec(l);
      if (m) codec[m[1]] = m[2].toUpperCase();
    }
    const rank = (pt) => { const i = want.indexOf(codec[pt]); return i < 0 ? 99 : i; };
    const drop = (pt) => codec[pt] !== undefined && rank(pt) === 99;
    return lines.filter((l) => {
      const m = /^a=(?:rtpmap|fmtp|rtcp-fb):(\d+)\s/.exec(l);
      return !(m && drop(m[1]));
    }).map((l) => {
      const m = /^(m=audio \d+ \S+)((?: \d+)*)$/.exec(l);
      if (!m) return l;
      // only the wanted codecs, in the order asked
      const pts = m[2].trim().split(' ').filter((pt) => !drop(pt));
      pts.sort((a, b) => rank(a) - rank(b));
      return m[1] + ' ' + pts.join(' ');
    }).join('\r\n');
  }

  // ---- sessions ----------------------------------------------------------------------------
  function mediaOptions() {
    return {
      mediaConstraints: { audio: MIC, video: false },
      pcConfig: { iceServers: [] },
      rtcOfferConstraints: { offerToReceiveAudio: true },
    };
  }

  function resolveEnd(data) {
    lastEnd = data;
    const ws = endWaiters;
    endWaiters = [];
    ws.forEach((w) => w(data));
  }

  function pushIncoming(res) {
    if (incomingWaiters.length) incomingWaiters.shift()(res);
    else incomingResults.push(res);
  }

  function onNewSession(data) {
    const s = data.session;
    const remote = data.originator === 'remote';
    const from = s.remote_identity ? s.remote_identity.uri.toString() : null;
    log('new_session', { originator: data.originator, reason: from });
    if (session && !session.isEnded()) {
      if (remote) {  // busy: one call at a time
        s.terminate({ status_code: 486, reason_phrase: 'Busy Here' });
        return;
      }
    }
    session = s;
    lastEnd = null;
    stopCapture();
    if (s.connection) hookConnection(s.connection);
    s.on('peerconnection', (e) => hookConnection(e.peerconnection));
    s.on('sdp', (e) => {
      if (e.originator === 'local' && s.__codecs) e.sdp = keepCodecs(e.sdp, s.__codecs);
    });
    s.on('progress', (e) => {
      const code = e.response ? e.response.status_code : null;
      log('progress', { originator: e.originator, code: code });
      setStatus(remote ? 'Ringing (incoming from ' + from + ')' : 'Ringing' + (code ? ' (' + code + ')' : ''));
    });
    s.on('accepted', (e) => {
      if (!remote && timing.accepted === null) timing.accepted = now();
      log('accepted', { originator: e.originator, code: e.response ? e.response.status_code : null });
      setStatus('In call');
    });
    s.on('confirmed', (e) => {
      log('confirmed', { originator: e.originator });
      attachFromReceivers(s.connection);
      setStatus('In call with ' + (from || 'remote'));
      if (remote) pushIncoming({ ok: true, from: from });
      refreshButtons();
    });
    const finish = (kind) => (e) => {
      const code = e.message && e.message.status_code ? e.message.status_code : null;
      log(kind, { originator: e.originator, code: code, reason: e.cause });
      if (pendingIncoming === s) pendingIncoming = null;
      if (session === s) stopCapture();  // heard() keeps what was captured, up to the end
      if (remote && kind === 'failed') pushIncoming({ ok: false, code: code, reason: e.cause });
      resolveEnd({ cause: e.cause, originator: e.originator, code: code });
      setStatus((kind === 'ended' ? 'Call ended: ' : 'Call failed: ') + e.cause +
        ' (' + e.originator + ')' + (ua && ua.isRegistered() ? '; registered' : ''));
      refreshButtons();
    };
    s.on('ended', finish('ended'));
    s.on('failed', finish('failed'));
    if (remote) {
      if (autoAnswerOn) {
        s.answer(mediaOptions());
      } else {
        pendingIncoming = s;
        setStatus('Incoming call from ' + from);
      }
    }
    refreshButtons();
  }

  // ---- the API -----------------------------------------------------------------------------
  function stopUa() {
    if (!ua) return;
    try { ua.stop(); } catch (e) { /* ignore */ }
    ua = null;
  }

  function register(opts) {
    opts = opts || {};
    stopUa();
    token = opts.token || null;
    const expires = opts.expires || 300;
    return new Promise((resolve) => {
      let done = false;
      const finish = (res) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        resolve(res);
      };
      const config = {
        sockets: [new TapSocket(opts.endpoint)],
        uri: opts.uri,
        display_name: opts.displayName,
        register: false,
        register_expires: expires,
        session_timers: false,
        user_agent: 'Sautikit browser phone',
      };
      if (opts.authorizationUser) config.authorization_user = opts.authorizationUser;
      if (opts.realm) config.realm = opts.realm;
      let me;
      try {
        me = ua = new JsSIP.UA(config);
      } catch (e) {
        finish({ ok: false, code: null, reason: 'bad configuration: ' + e.message });
        return;
      }
      me.registrator().setExtraHeaders(token ? ['Authorization: Bearer ' + token] : []);
      const timer = setTimeout(() => finish({ ok: false, code: null,
        reason: 'WebSocket not connected after ' + CONNECT_WAIT_MS + ' ms' }), CONNECT_WAIT_MS);
      let t0 = null;
      // register only once the websocket is open: a REGISTER sent while it is still
      // connecting fails at once with "Connection Error"
      // JsSIP reconnects a dropped websocket but (register: false) does not register again:
      // do it here if the registration was up (with the current token)
      me.on('connected', () => {
        log('ws_connected');
        if (me !== ua) return;
        if (!done) { t0 = now(); me.register(); } else if (me.__keep) me.register();
      });
      me.on('disconnected', (e) => log('ws_disconnected', { code: e && e.code, reason: e && e.reason }));
      me.on('registered', (e) => {
        const ex = contactExpires(e.response.data || '');
        log('registered', { code: e.response.status_code, reason: 'expires ' + ex });
        setStatus('Registered as ' + opts.uri + (ex !== null ? ' (expires ' + ex + ' s)' : ''));
        refreshButtons();
        me.__keep = true;
        finish({ ok: true, code: e.response.status_code, expires: ex,
          rtt_ms: t0 === null ? null : now() - t0 });
      });
      me.on('unregistered', (e) => {
        log('unregistered', { code: e && e.response ? e.response.status_code : null, reason: e && e.cause });
        setStatus('Not registered');
        refreshButtons();
      });
      me.on('registrationFailed', (e) => {
        const code = e.response ? e.response.status_code : null;
        log('registration_failed', { code: code, reason: e.cause });
        setStatus('Registration failed: ' + (code ? code + ' ' : '') + e.cause);
        refreshButtons();
        finish({ ok: false, code: code, reason: e.cause });
      });
      me.on('newRTCSession', onNewSession);
      me.start();
    });
  }

  function setToken(t) {
    token = t;
    if (ua) ua.registrator().setExtraHeaders(['Authorization: Bearer ' + t]);
    return Promise.resolve({ ok: true });
  }

  // Re-REGISTER now (with a new token if given); resolves on the final response.
  function refresh(t) {
    if (t) setToken(t);
    if (!ua) return Promise.resolve({ ok: false, code: null, reason: 'not started' });
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ ok: false, code: null, reason: 'timeout' }), 10000);
      regResponseWaiters.push((res) => { clearTimeout(timer); resolve(res); });
      ua.register();
    });
  }

  function call(target, opts) {
    opts = opts || {};
    if (!ua) return Promise.resolve({ ok: false, code: null, reason: 'not registered' });
    endSelfTest();
    audioContext();
    timing = { start: now(), inviteSent: null, accepted: null, firstAudio: null };
    return new Promise((resolve) => {
      const o = mediaOptions();
      o.extraHeaders = (token ? ['Authorization: Bearer ' + token] : []).concat(opts.headers || []);
      let s;
      try {
        s = ua.call(target, o);
      } catch (e) {
        resolve({ ok: false, code: null, reason: String(e.message || e) });
        return;
      }
      if (opts.codecs) s.__codecs = opts.codecs;  // applied to the offer by the 'sdp' handler
      let done = false;
      const ok = () => { if (!done) { done = true; resolve({ ok: true }); } };
      s.on('accepted', ok);
      s.on('confirmed', ok);
      s.on('failed', (e) => {
        if (done) return;
        done = true;
        resolve({ ok: false, code: e.message && e.message.status_code ? e.message.status_code : null,
          reason: e.cause });
      });
    });
  }

  function answer() {
    const s = pendingIncoming;
    if (!s) return Promise.resolve({ ok: false, reason: 'no incoming call' });
    pendingIncoming = null;
    audioContext();
    s.answer(mediaOptions());
    refreshButtons();
    return Promise.resolve({ ok: true });
  }

  function autoAnswer(on) {
    autoAnswerOn = on === undefined ? true : !!on;
    if (autoAnswerOn && pendingIncoming) answer();
    return Promise.resolve({ ok: true, autoAnswer: autoAnswerOn });
  }

  function incoming() {
    if (incomingResults.length) return Promise.resolve(incomingResults.shift());
    return new Promise((resolve) => incomingWaiters.push(resolve));
  }

  function ended() {
    if (!session) return Promise.resolve({ cause: null, originator: null, code: null, noSession: true });
    if (session.isEnded() && lastEnd) return Promise.resolve(lastEnd);
    return new Promise((resolve) => endWaiters.push(resolve));
  }

  function hangup() {
    const s = session;
    if (!s || s.isEnded()) return Promise.resolve({ ok: true, already: true });
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ ok: false, reason: 'no end after ' + HANGUP_WAIT_MS + ' ms' }),
        HANGUP_WAIT_MS);
      endWaiters.push((d) => { clearTimeout(timer); resolve(Object.assign({ ok: true }, d)); });
      try {
        s.terminate();
      } catch (e) {
        clearTimeout(timer);
        resolve({ ok: true, already: true, reason: String(e.message || e) });
      }
    });
  }

  function unregister() {
    if (ua) ua.__keep = false;
    if (!ua || !ua.isRegistered()) return Promise.resolve({ ok: true, already: true });
    const me = ua;
    me.__keep = false;
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ ok: false, reason: 'timeout' }), UNREGISTER_WAIT_MS);
      me.once('unregistered', () => { clearTimeout(timer); resolve({ ok: true }); });
      me.unregister();
    });
  }

  // Hang up, unregister and close the websocket (before closing the page: a closed page sends
  // no BYE and leaves its registration until it expires).
  async function stop() {
    const h = await hangup();
    const u = await unregister();
    const me = ua;
    ua = null;
    if (me) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, UNREGISTER_WAIT_MS);
        me.once('disconnected', () => { clearTimeout(timer); resolve(); });
        try { me.stop(); } catch (e) { clearTimeout(timer); resolve(); }
        if (!me.isConnected()) { clearTimeout(timer); resolve(); }
      });
    }
    refreshButtons();
    setStatus('Stopped');
    return { ok: true, hangup: h, unregister: u };
  }

  function state() {
    return Promise.resolve({
      registered: !!(ua && ua.isRegistered()),
      inCall: !!(session && !session.isEnded()),
      events: events.slice(),
    });
  }

  function timings() {
    const rel = (t) => (timing.start === null || t === null ? null : t - timing.start);
    return Promise.resolve({
      invite_ms: timing.start === null ? null : 0,
      invite_sent_ms: rel(timing.inviteSent),  // after getUserMedia, the offer, ICE gathering
      answered_ms: rel(timing.accepted),
      first_audio_ms: rel(timing.firstAudio),
    });
  }

  function endSelfTest() {
    const st = window.__sautiSelfTest;
    if (!st) return;
    window.__sautiSelfTest = null;
    st.pc1.close();
    st.pc2.close();
    st.mic.getTracks().forEach((t) => t.stop());
    stopCapture();
  }

  // Loopback without SIP: pc1 sends the microphone, pc2's remote track goes to the capture
  // path above. codec: 'PCMU' (default, as toward the gateway), 'PCMA' or null (browser default).
  async function _selfTest(opts) {
    opts = opts || {};
    const codec = opts.codec === undefined ? 'PCMU' : opts.codec;
    endSelfTest();
    audioContext();
    timing = { start: now(), inviteSent: null, accepted: null, firstAudio: null };
    const mic = await navigator.mediaDevices.getUserMedia({ audio: MIC, video: false });
    const pc1 = new RTCPeerConnection({ iceServers: [] });
    const pc2 = new RTCPeerConnection({ iceServers: [] });
    pc1.onicecandidate = (e) => { if (e.candidate) pc2.addIceCandidate(e.candidate); };
    pc2.onicecandidate = (e) => { if (e.candidate) pc1.addIceCandidate(e.candidate); };
    hookConnection(pc2);
    mic.getTracks().forEach((t) => pc1.addTrack(t, mic));
    let offer = await pc1.createOffer();
    if (codec) offer = { type: 'offer', sdp: keepCodecs(offer.sdp, [codec]) };
    await pc1.setLocalDescription(offer);
    await pc2.setRemoteDescription(offer);
    const ans = await pc2.createAnswer();
    await pc2.setLocalDescription(ans);
    await pc1.setRemoteDescription(ans);
    await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('self-test ICE: ' + pc2.iceConnectionState)), 10000);
      const check = () => {
        if (['connected', 'completed'].indexOf(pc2.iceConnectionState) >= 0) {
          clearTimeout(t);
          resolve();
        }
      };
      pc2.addEventListener('iceconnectionstatechange', check);
      check();
    });
    timing.accepted = now();
    window.__sautiSelfTest = { pc1: pc1, pc2: pc2, mic: mic };
    const m = /^a=rtpmap:\d+ ([^/]+)\//m.exec(pc2.remoteDescription.sdp);
    return { ok: true, codec: m ? m[1] : null, rate: actx.sampleRate };
  }

  window.sautiPhone = {
    register: register,
    setToken: setToken,
    refresh: refresh,
    call: call,
    answer: answer,
    autoAnswer: autoAnswer,
    incoming: incoming,
    hangup: hangup,
    unregister: unregister,
    stop: stop,
    ended: ended,
    state: state,
    timings: timings,
    heard: () => Promise.resolve(heardPcm()),
    clearHeard: () => { capture.chunks = []; capture.length = 0; return Promise.resolve({ ok: true }); },
    sipLog: () => Promise.resolve(sip.slice()),
    debug: (on) => {
      if (on === false) JsSIP.debug.disable(); else JsSIP.debug.enable('JsSIP:*');
      return Promise.resolve({ ok: true });
    },
    _selfTest: _selfTest,
  };

  // ---- the page ----------------------------------------------------------------------------
  // ?token=&endpoint=&uri=[&displayName=][&autoanswer=1][&debug=1], or the token mint's JSON
  // response in the hash (#{"token":...,"endpoint":...,"sipProfile":{"uri":...}}).
  function pageParams() {
    const q = new URLSearchParams(location.search);
    let p = {};
    if (location.hash.length > 1) {
      try {
        p = JSON.parse(decodeURIComponent(location.hash.slice(1)));
      } catch (e) {
        setStatus('The URL hash is not JSON: ' + e.message);
      }
    }
    const prof = p.sipProfile || {};
    return {
      token: p.token || q.get('token'),
      endpoint: p.endpoint || q.get('endpoint'),
      uri: p.uri || prof.uri || q.get('uri'),
      displayName: p.displayName || prof.display_name || q.get('displayName') || undefined,
      authorizationUser: prof.authorization_user || undefined,
      autoanswer: q.get('autoanswer') === '1',
      debug: q.get('debug') === '1',
      demo: q.get('demo') === '1',
    };
  }

  // ?demo=1: the gateway's demo mode mints a token for this page (POST /demo/phone/token; no
  // API token, loopback-only demo set-ups). Elsewhere the route does not exist.
  async function demoToken() {
    const base = location.pathname.replace(/\/(phone\.html)?$/, '');
    const r = await fetch(base + '/token', { method: 'POST' });
    if (r.status !== 201) throw new Error('HTTP ' + r.status + ' (is the gateway in demo mode?)');
    return r.json();
  }

  function wire() {
    const p = pageParams();
    if (p.debug) JsSIP.debug.enable('JsSIP:*');
    $('version').textContent = 'JsSIP ' + JsSIP.version;
    $('call').addEventListener('click', () => {
      const target = $('number').value.trim();
      if (!target) { setStatus('Type a number to call'); return; }
      setStatus('Calling ' + target + '...');
      call(target).then((r) => { if (!r.ok) setStatus('Call failed: ' + (r.code || '') + ' ' + r.reason); });
      refreshButtons();
    });
    $('hangup').addEventListener('click', () => hangup());
    $('answer').addEventListener('click', () => answer());
    $('number').addEventListener('keydown', (e) => { if (e.key === 'Enter') $('call').click(); });
    if (p.autoanswer) autoAnswer(true);
    refreshButtons();
    if (p.token && p.endpoint && p.uri) {
      setStatus('Registering as ' + p.uri + '...');
      register({ token: p.token, endpoint: p.endpoint, uri: p.uri, displayName: p.displayName,
        authorizationUser: p.authorizationUser });
    } else if (p.demo) {
      setStatus('Getting a demo token...');
      demoToken().then((m) => {
        if (!$('number').value) $('number').value = '+254700000001';
        setStatus('Registering as ' + m.sipProfile.uri + '...');
        return register({ token: m.token, endpoint: m.endpoint, uri: m.sipProfile.uri,
          displayName: m.sipProfile.display_name });
      }).catch((e) => setStatus('No demo token: ' + e.message));
    } else {
      setStatus('Not registered: open this page with ?demo=1 (demo mode), ' +
        '?token=...&endpoint=...&uri=... or the token mint\'s JSON in the URL hash');
    }
  }

  window.addEventListener('beforeunload', () => {
    // a closed page sends no BYE: end the call (and the registration) while the socket is open
    if (session && !session.isEnded()) { try { session.terminate(); } catch (e) { /* ignore */ } }
    if (ua) { try { ua.stop(); } catch (e) { /* ignore */ } }
  });

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', wire);
  else wire();
})();
