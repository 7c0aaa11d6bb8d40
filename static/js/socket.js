// A websocket to /ws/chat/ that reconnects by itself (backoff with jitter) and queues frames while down.

export class ChatSocket {
  constructor({ onFrame, onState, onReopen, path = "/ws/chat/" }) {
    this.onFrame = onFrame;
    this.onState = onState || (() => {});
    this.onReopen = onReopen || (() => {});
    this.url = `${window.location.protocol === "https:" ? "wss" : "ws"}://${window.location.host}${path}`;
    this.outbox = [];
    this.attempt = 0;
    this.opened = false;
    this.ws = null;
  }

  connect() {
    this.onState("connecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.addEventListener("open", () => {
      const reopened = this.opened;
      this.opened = true;
      this.attempt = 0;
      this.onState("open");
      if (reopened) this.onReopen();
      while (this.outbox.length && ws.readyState === WebSocket.OPEN) ws.send(this.outbox.shift());
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      this.onFrame(frame);
    });
    ws.addEventListener("close", () => {
      if (this.ws !== ws) return;
      this.onState("closed");
      const delay = Math.min(5000, 300 * 2 ** this.attempt) * (0.8 + Math.random() * 0.4);
      this.attempt += 1;
      setTimeout(() => this.connect(), delay);
    });
  }

  send(frame) {
    const data = JSON.stringify(frame);
    // Messages carry a client_id, so a frame re-sent after a reconnect is not answered twice.
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(data);
    else if (frame.type !== "subscribe") this.outbox.push(data);
  }

  // For tests: drop the connection as a network failure would.
  drop() {
    if (this.ws) this.ws.close(4000, "dropped");
  }
}
