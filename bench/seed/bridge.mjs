// The seed tutorial's stack (../shared/seed: "WebSockets with RxJS"), bridged to MQTT: the peer
// bench/run measures the daemon against. Same shape as the tutorial's service: rxjs
// `webSocket` (with `ws` as its WebSocketCtor, the bearer token in the handshake), piped
// through backoff-rxjs `retryBackoff({initialInterval: 1000, maxInterval: 10000,
// resetOnSuccess: true})` and `shareReplay({bufferSize: 1, refCount: true})`; its one
// subscriber publishes each room's value retained with mqtt.js, as the daemon does
// (`<base>/<room>/patients` and `<base>/<room>/state`, QoS 0).
//
//   node bench/seed/bridge.mjs CONFIG.json
//
// CONFIG is the daemon's config shape (upstream.url, upstream.token, rooms[].id, mqtt.host,
// mqtt.port, mqtt.base_topic, mqtt.client_id), written as JSON by bench/procs.py.
import { readFileSync } from 'node:fs';
import { webSocket } from 'rxjs/webSocket';
import { retryBackoff } from 'backoff-rxjs';
import { shareReplay } from 'rxjs/operators';
import WebSocket from 'ws';
import mqtt from 'mqtt';

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const rooms = cfg.rooms.map((r) => r.id);
const base = cfg.mqtt.base_topic;
const token = cfg.upstream.token;

// The tutorial runs in a browser, where the token goes in the URL; `ws` can send the header
// PROTOCOL.md asks for.
class AuthedWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols, { headers: { Authorization: `Bearer ${token}` }, perMessageDeflate: false });
  }
}

const broker = mqtt.connect({
  host: cfg.mqtt.host || '127.0.0.1',
  port: cfg.mqtt.port,
  clientId: cfg.mqtt.client_id || 'waiting-room-seed',
  will: { topic: `${base}/status`, payload: 'offline', qos: 1, retain: true },
  reconnectPeriod: 1000,
});
broker.on('connect', () => {
  broker.stream.setNoDelay?.(true); // as the daemon (TCP_NODELAY) and ws do
  broker.publish(`${base}/status`, 'online', { qos: 1, retain: true });
});

const socket$ = webSocket({
  url: cfg.upstream.url,
  WebSocketCtor: AuthedWebSocket,
  openObserver: {
    next: (event) => {
      for (const room of rooms) event.target.send(JSON.stringify({ type: 'join', room }));
    },
  },
});

const stream$ = socket$.pipe(
  retryBackoff({ initialInterval: 1000, maxInterval: 10000, resetOnSuccess: true }),
  shareReplay({ bufferSize: 1, refCount: true }),
);

const retain = { qos: 0, retain: true };
stream$.subscribe((ev) => {
  if (ev.type === 'queue') {
    const room = ev.room ?? rooms[0];
    broker.publish(`${base}/${room}/patients`, String(ev.patients), retain);
    broker.publish(`${base}/${room}/state`, JSON.stringify({
      patients: ev.patients, now_serving: ev.now_serving ?? null, updated_at: ev.ts ?? null,
      stale: false, error: null,
    }), retain);
  } else if (ev.type === 'ping') {
    socket$.next({ type: 'pong' });
  }
});

const stop = () => {
  broker.publish(`${base}/status`, 'offline', { qos: 1, retain: true }, () => {
    broker.end(false, () => process.exit(0));
  });
  setTimeout(() => process.exit(0), 1000).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
