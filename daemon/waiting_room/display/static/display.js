/* The kiosk page: renders what the daemon pushes, and is honest when the feed stops.
 *
 * Every string from the daemon or the hospital system goes into the page with textContent,
 * never as HTML. The page never reloads itself: when the daemon is unreachable or its
 * heartbeats stop, it keeps the last values under an "offline" banner and reconnects with
 * exponential backoff and full jitter, the same rules the daemon follows upstream, so a
 * ward full of screens does not hammer a daemon that is restarting.
 */
(function () {
  'use strict';

  var cfg = JSON.parse(document.body.dataset.config);
  var token = new URLSearchParams(location.search).get('token');
  var pageLocale = cfg.locale;
  var roomsEl = document.querySelector('[data-role=rooms]');
  var bannerEl = document.querySelector('[data-role=banner]');
  var clockEl = document.querySelector('[data-role=clock]');
  var rooms = Object.create(null); // id -> {conf, data, el, parts}
  var order = [];

  var conn = {
    ws: null,
    online: false, // a full state arrived on the current socket and heartbeats keep coming
    lostOnce: false, // a socket failed or closed at least once: "offline", not "connecting"
    heartbeat: cfg.heartbeat,
    openedAt: 0,
    lastMessage: 0,
    lastContact: null, // server time of the last message, for "last updated" when offline
    link: null, // the upstream as the daemon last said: {status, feed, poll_interval, ...}
    skew: 0, // server clock minus this screen's clock, in seconds
    attempt: 0,
    retryTimer: null,
    stableTimer: null
  };

  // -- language ------------------------------------------------------------------------

  function localeOf(code) {
    return cfg.locales[code] || cfg.locales[pageLocale];
  }

  function tr(code, key, vars) {
    var table = localeOf(code).strings;
    var text = Object.prototype.hasOwnProperty.call(table, key) ? table[key] : null;
    if (text === null) {
      var fallback = localeOf(pageLocale).strings;
      text = Object.prototype.hasOwnProperty.call(fallback, key) ? fallback[key] : key;
    }
    return text.replace(/\{(\w+)\}/g, function (whole, name) {
      return vars && Object.prototype.hasOwnProperty.call(vars, name) ? String(vars[name]) : whole;
    });
  }

  function digits(code, text) {
    var set = localeOf(code).digits;
    return String(text).replace(/[0-9]/g, function (d) { return set.charAt(+d); });
  }

  function serverNow() {
    return Date.now() / 1000 + conn.skew;
  }

  function clockText(code, seconds) {
    if (typeof seconds !== 'number') return '–';
    var when = new Date(seconds * 1000); // the daemon's time, in this screen's time zone
    var hh = String(when.getHours()).padStart(2, '0');
    var mm = String(when.getMinutes()).padStart(2, '0');
    return digits(code, hh + ':' + mm);
  }

  // -- building and rendering -----------------------------------------------------------

  function part(parent, tag, role) {
    var el = document.createElement(tag);
    el.dataset.role = role;
    parent.appendChild(el);
    return el;
  }

  function addRoom(conf) {
    var code = conf.locale || pageLocale;
    var el = document.createElement('section');
    el.className = 'room';
    el.dataset.room = conf.id;
    el.dataset.state = 'connecting';
    el.lang = code;
    el.dir = localeOf(code).dir;
    var room = {
      conf: conf,
      code: code,
      data: null,
      el: el,
      parts: {
        name: part(el, 'h2', 'name'),
        label: part(el, 'p', 'label'),
        patients: part(el, 'p', 'patients'),
        serving: part(el, 'p', 'now-serving'),
        status: part(el, 'p', 'status')
      }
    };
    rooms[conf.id] = room;
    order.push(conf.id);
    roomsEl.appendChild(el);
    return room;
  }

  function stateOf(room) {
    var data = room.data;
    if (!conn.online) return conn.lostOnce ? 'offline' : 'connecting';
    if (data && (data.removed || data.error)) return 'error';
    if (!data || typeof data.patients !== 'number') return 'connecting';
    return data.stale ? 'paused' : 'live';
  }

  function statusText(room, state) {
    var data = room.data;
    var code = room.code;
    switch (state) {
      case 'connecting':
        return tr(code, 'connecting');
      case 'paused':
        return tr(code, 'paused', { time: clockText(code, data.as_of) });
      case 'offline':
        if (!data || typeof data.patients !== 'number') return tr(code, 'offline_room_never');
        return tr(code, 'offline_room', {
          time: clockText(code, data.stale ? data.as_of : conn.lastContact)
        });
      case 'error':
        if (data.removed) return tr(code, 'removed');
        var key = 'error_' + data.error;
        var table = localeOf(code).strings;
        return tr(code, Object.prototype.hasOwnProperty.call(table, key) ? key : 'error_other');
      case 'live':
        // Values polled from the hospital's snapshot: fresh, but every few seconds.
        if (feedOf() === 'poll' && typeof conn.link.poll_interval === 'number') {
          return tr(code, 'polled', { n: digits(code, Math.round(conn.link.poll_interval)) });
        }
        return '';
      default:
        return '';
    }
  }

  // "socket" (live updates), "poll" (the daemon polls the snapshot) or null.
  function feedOf() {
    var link = conn.link;
    return link && (link.feed === 'socket' || link.feed === 'poll') ? link.feed : null;
  }

  function render(room) {
    var data = room.data;
    var code = room.code;
    var state = stateOf(room);
    var p = room.parts;
    var known = data && typeof data.patients === 'number';
    var number = known ? digits(code, Math.trunc(data.patients)) : '–';
    var name = (data && typeof data.name === 'string' && data.name) || room.conf.name;
    p.name.textContent = name;
    p.label.textContent = room.conf.label || tr(code, 'waiting');
    p.patients.textContent = number;
    p.patients.dataset.len = String(number.length);
    p.serving.textContent = known && typeof data.now_serving === 'string' && data.now_serving
      ? tr(code, 'now_serving', { ticket: data.now_serving }) : '';
    p.status.textContent = statusText(room, state);
    room.el.dataset.state = state;
    var feed = state === 'live' ? feedOf() : null;
    if (feed) room.el.dataset.feed = feed;
    else delete room.el.dataset.feed;
    room.el.setAttribute('aria-label', name + ': ' + tr(code, 'waiting_sentence', { n: number }));
  }

  function renderAll() {
    for (var i = 0; i < order.length; i++) render(rooms[order[i]]);
    var pageState = conn.online ? 'live' : conn.lostOnce ? 'offline' : 'connecting';
    document.body.dataset.state = pageState;
    if (pageState === 'offline') {
      bannerEl.textContent = tr(pageLocale, 'offline_banner');
      bannerEl.hidden = false;
    } else {
      bannerEl.hidden = true;
      bannerEl.textContent = '';
    }
  }

  // The grid that makes each room's cell as large as possible: no scrolling, ever.
  function layout() {
    var n = Math.max(1, order.length);
    var width = roomsEl.clientWidth || window.innerWidth;
    var height = roomsEl.clientHeight || window.innerHeight;
    var best = 1;
    var bestSize = 0;
    for (var cols = 1; cols <= n; cols++) {
      var rows = Math.ceil(n / cols);
      var size = Math.min(width / cols / 1.2, height / rows);
      if (size > bestSize) {
        bestSize = size;
        best = cols;
      }
    }
    roomsEl.style.setProperty('--cols', String(best));
    roomsEl.style.setProperty('--rows', String(Math.ceil(n / best)));
  }

  function tick() {
    clockEl.textContent = clockText(pageLocale, serverNow());
    clockEl.dateTime = new Date().toISOString();
  }

  // -- the push channel -----------------------------------------------------------------

  function wsUrl() {
    var url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + cfg.ws;
    if (token) url += (cfg.ws.indexOf('?') < 0 ? '?' : '&') + 'token=' + encodeURIComponent(token);
    return url;
  }

  function connect() {
    conn.retryTimer = null;
    var ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (e) {
      lost();
      return;
    }
    conn.ws = ws;
    conn.openedAt = performance.now();
    conn.lastMessage = conn.openedAt;
    ws.onmessage = function (event) {
      if (conn.ws === ws) receive(event.data);
    };
    ws.onclose = function () {
      if (conn.ws === ws) {
        conn.ws = null;
        lost();
      }
    };
  }

  function lost() {
    conn.online = false;
    conn.lostOnce = true;
    clearTimeout(conn.stableTimer);
    renderAll();
    if (conn.retryTimer !== null) return;
    var initial = cfg.backoff[0];
    var cap = Math.min(cfg.backoff[1], initial * Math.pow(2, conn.attempt));
    conn.attempt = Math.min(conn.attempt + 1, 32);
    var delay = Math.max(initial / 10, Math.random() * cap); // full jitter
    conn.retryTimer = setTimeout(connect, delay * 1000);
  }

  function drop() {
    var ws = conn.ws;
    conn.ws = null;
    if (ws) {
      try { ws.close(); } catch (e) { /* already closing */ }
    }
    lost();
  }

  function receive(text) {
    var msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    conn.lastMessage = performance.now();
    if (typeof msg.now === 'number') {
      conn.skew = msg.now - Date.now() / 1000;
      conn.lastContact = msg.now;
    }
    if (msg.type === 'hello') {
      if (typeof msg.heartbeat === 'number' && msg.heartbeat > 0) conn.heartbeat = msg.heartbeat;
    } else if (msg.type === 'state') {
      applyState(msg);
    }
  }

  function applyState(msg) {
    var list = Array.isArray(msg.rooms) ? msg.rooms : [];
    var added = false;
    for (var i = 0; i < list.length; i++) {
      var data = list[i];
      if (!data || typeof data.room !== 'string') continue;
      var room = rooms[data.room];
      if (!room) {
        if (cfg.room !== null) continue;
        room = addRoom({ id: data.room, name: String(data.name || data.room), locale: null, label: null });
        added = true;
      }
      room.data = data;
    }
    if (msg.link && typeof msg.link === 'object') conn.link = msg.link;
    var removed = Array.isArray(msg.removed) ? msg.removed : [];
    for (var j = 0; j < removed.length; j++) {
      var gone = rooms[removed[j]];
      if (gone) gone.data = { removed: true };
    }
    if (!conn.online) {
      // The first full state on this socket: live from here on.
      conn.online = true;
      clearTimeout(conn.stableTimer);
      conn.stableTimer = setTimeout(function () { conn.attempt = 0; }, cfg.stable * 1000);
    }
    if (added) layout();
    renderAll();
  }

  // The daemon may hang with its socket still open: only its heartbeats prove it is alive.
  function watchdog() {
    if (!conn.ws) return;
    var limit = (2 * conn.heartbeat + 1) * 1000;
    if (performance.now() - conn.lastMessage > limit) drop();
  }

  // -- start ----------------------------------------------------------------------------

  document.body.dataset.scope = cfg.room === null ? 'all' : 'room';
  for (var i = 0; i < cfg.rooms.length; i++) addRoom(cfg.rooms[i]);
  layout();
  renderAll();
  tick();
  window.addEventListener('resize', layout);
  setInterval(tick, 1000);
  setInterval(watchdog, 250);
  connect();
})();
