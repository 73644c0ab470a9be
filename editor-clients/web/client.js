"use strict";
// The livekv websocket client of the browser demo (protocol: docs/protocol.md), written to
// survive its server going away, as a replica of `livekv serve --replicas N` can:
// - a dropped connection is opened again (with backoff), and the requests it left unanswered
//   are sent again on the new one;
// - a request about a document the server does not hold gets `unknown_uri` (a new connection,
//   another replica): the client re-opens the document with its own text and version, then
//   retries the request. An edit the re-opened text already holds is answered by that open.
// The client's text is the truth, so no edit is lost. Browsers cannot set headers on a
// WebSocket, so this client sends no X-Livekv-Workspace: under Ray Serve its connections are
// spread over the replicas, and it re-opens where it lands.

class LivekvClient {
  constructor(url, { token = null, onStatus = () => {}, onToken = () => {}, onError = () => {} } = {}) {
    Object.assign(this, { url, token, onStatus, onToken, onError });
    this.docs = new Map();        // uri -> {text, version}: the client's own, acknowledged or not
    this.pending = new Map();     // id -> {msg, onReply, parked}: requests not answered yet
    this.reopening = new Map();   // uri -> version an open in flight re-sends it at
    this.cancelled = new Set();   // completions the client cancelled, still pending
    this.cancels = new Set();     // cancels sent, whose "ok" (same id as the completion) is to come
    this.nextId = 1;
    this.delay = 0;
    this.connect();
  }

  connect() {
    const ws = this.ws = new WebSocket(this.url);
    ws.onopen = () => {
      this.delay = 0;
      this.cancels.clear();
      const hello = this.token ? { type: "hello", token: this.token } : { type: "hello" };
      this.request(hello, (r) => this.onStatus(r.type === "ok" ? "open" : "refused", r));
      for (const [id, p] of this.pending) {   // in the order they were first sent
        if (p.msg.type === "hello" && id !== hello.id) this.pending.delete(id);
        else if (id !== hello.id) this.resend(id, p);
      }
    };
    ws.onmessage = (e) => this.receive(JSON.parse(e.data));
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      if (e.code === 1008) { this.onStatus("closed", e); return; }   // refused (token): retrying cannot help
      this.reopening.clear();   // the opens in flight are pending requests: they are sent again
      for (const p of this.pending.values()) p.parked = false;
      this.delay = Math.min(5000, this.delay ? 2 * this.delay : 250);
      this.onStatus("reconnecting", e);
      setTimeout(() => this.connect(), this.delay);
    };
  }

  transmit(msg) { if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg)); }

  // Send msg (or keep it until the connection is open); onReply gets its final reply.
  request(msg, onReply) {
    msg.id = this.nextId++;
    this.pending.set(msg.id, { msg, onReply, parked: false });
    this.transmit(msg);
    return msg.id;
  }

  // A request the connection it went on did not answer: again, unless it was cancelled meanwhile.
  resend(id, p) {
    if (this.cancelled.has(id)) this.answer(id, { type: "done", id, text: "", cancelled: true });
    else this.transmit(p.msg);
  }

  answer(id, reply) {
    const p = this.pending.get(id);
    this.pending.delete(id);
    this.cancelled.delete(id);
    if (p && p.onReply) p.onReply(reply);
  }

  receive(msg) {
    if (msg.type === "token") return this.onToken(msg);
    if (msg.type === "ok" && this.cancels.delete(msg.id)) return;
    const p = this.pending.get(msg.id);
    if (!p) { if (msg.type === "error") this.onError(msg); return; }
    const uri = msg.uri || p.msg.uri;
    if (msg.type === "error" && msg.code === "unknown_uri" && p.msg.type !== "open" && this.docs.has(uri)) {
      p.parked = true;
      if (!this.reopening.has(uri)) this.reopen(uri);
      return;
    }
    this.answer(msg.id, msg);
  }

  // Re-send uri's text; then answer the edits it holds and retry the other parked requests.
  reopen(uri) {
    const doc = this.docs.get(uri), version = doc.version;
    this.reopening.set(uri, version);
    this.request({ type: "open", uri, text: doc.text, version }, (r) => {
      this.reopening.delete(uri);
      if (r.type === "ok") this.onStatus("reopened", { uri, version });
      for (const [id, p] of this.pending) {
        if (!p.parked || p.msg.uri !== uri) continue;
        p.parked = false;
        if (r.type !== "ok" || (p.msg.type === "edit" && p.msg.version <= version)) this.answer(id, { ...r, id });
        else this.resend(id, p);
      }
    });
  }

  open(uri, text, version, onReply) {
    this.docs.set(uri, { text, version });
    return this.request({ type: "open", uri, text, version }, onReply);
  }

  // One change; `text` is the document after it (the client's copy, for a re-open).
  edit(uri, change, text, onReply) {
    const doc = this.docs.get(uri);
    doc.text = text;
    return this.request({ type: "edit", uri, version: ++doc.version, changes: [change] }, onReply);
  }

  complete(uri, line, character, maxNewTokens, onReply) {
    return this.request({ type: "complete", uri, line, character, maxNewTokens }, onReply);
  }

  cancel(id) {
    if (!this.pending.has(id)) return;
    this.cancelled.add(id);
    if (this.ws.readyState === WebSocket.OPEN && !this.pending.get(id).parked) {
      this.cancels.add(id);
      this.transmit({ type: "cancel", id });
    }
  }
}
