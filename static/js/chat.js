// The chat page: conversations over REST, replies streamed over the /ws/chat/ websocket.
// The socket reconnects by itself; what is on screen is kept and reconciled with the server afterwards.

import { api, readJsonScript, results } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { ChatSocket } from "./socket.js";

const config = readJsonScript("page-config", { currency: "" });
const agents = readJsonScript("agents-data", []);

const el = {
  agent: document.getElementById("agent-select"),
  connection: document.getElementById("connection"),
  list: document.getElementById("conversation-list"),
  messages: document.getElementById("messages"),
  hint: document.getElementById("empty-hint"),
  form: document.getElementById("composer"),
  input: document.getElementById("message-input"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  newConversation: document.getElementById("new-conversation"),
};

// Plain words for failed replies, by error code or message status.
const FAILURE_WORDS = {
  insufficient_balance: "Your balance is too low for this reply. Top up, then retry.",
  quota_exceeded: "You have used this month's quota.",
  key_budget_exceeded: "This key's monthly budget is used up.",
  content_violation: "This message was refused by the content rules.",
  content_refused: "This message was refused by the content rules.",
  moderation: "This message was refused by the content rules.",
  rate_limited: "Too many requests right now. Wait a moment and retry.",
  too_many_conversations: "Too many replies are running at once. Wait for one to finish.",
  conversation_busy: "This conversation is still answering. Wait for it to finish.",
  upstream_timeout: "The model took too long to answer (model error).",
  no_healthy_deployment: "No model is available right now (model error).",
  llm_error: "The model failed to answer (model error).",
  error: "Something went wrong with this reply.",
  interrupted: "The reply was interrupted. Retry to get a full reply.",
  cancelled: "Stopped.",
  connection_lost: "The connection dropped before the reply was complete. Retry to get a full reply.",
};
const STATUS_WORDS = { thinking: "Thinking…", generating: "Generating…", pending: "Waiting…", processing: "Thinking…",
                       reconnecting: "Connection lost, reconnecting…" };
// After a reconnect, a reply the server still shows as in progress is re-read this often until it is final.
const RECONCILE_POLL_MS = 1000;
const RECONCILE_POLL_TRIES = 120;
const FINAL_FAILURES = new Set(["error", "insufficient_balance", "content_violation", "llm_error"]);

const state = {
  conversation: null,           // id of the open conversation (null: a new one)
  startNew: true,               // the next message starts a new conversation ("new": true, no server dedupe)
  bubbles: new Map(),           // message id -> bubble
  pending: [],                  // assistant bubbles waiting for their message id (first status frame)
  streaming: new Set(),         // message ids being generated
  conversations: [],
};

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function formatMoney(value) {
  // Server money is a decimal string; trim without going through floats.
  if (value === null || value === undefined || value === "") return "";
  let text = String(value);
  if (text.includes(".")) text = text.replace(/0+$/, "").replace(/\.$/, "");
  return `${text} ${config.currency || ""}`.trim();
}

// --- bubbles ----------------------------------------------------------------------

function hideHint() { if (el.hint) el.hint.hidden = true; }

function createBubble(role, { id = null, text = "" } = {}) {
  hideHint();
  const node = document.createElement("article");
  node.className = `message ${role}`;
  node.innerHTML = `<div class="role"></div><div class="status-line" hidden></div><div class="content"></div>
    <div class="meta" hidden></div><div class="failure" hidden><span class="failure-text"></span>
    <small class="failure-detail"></small><button type="button" class="retry">Retry</button></div>`;
  node.querySelector(".role").textContent = role === "user" ? "You" : "Assistant";
  el.messages.appendChild(node);
  const bubble = { id, role, node, text, renderQueued: false, final: false };
  node.querySelector(".retry").addEventListener("click", () => retry(bubble));
  if (id !== null) bindBubble(bubble, id);
  setText(bubble, text);
  return bubble;
}

function bindBubble(bubble, id) {
  bubble.id = id;
  bubble.node.dataset.messageId = String(id);
  state.bubbles.set(String(id), bubble);
}

function setText(bubble, text) {
  bubble.text = text;
  if (bubble.renderQueued) return;
  bubble.renderQueued = true;
  // Re-render at most once per frame while deltas pour in.
  requestAnimationFrame(() => {
    bubble.renderQueued = false;
    bubble.node.querySelector(".content").innerHTML = renderMarkdown(bubble.text);
    scrollDown();
  });
}

function setStatus(bubble, status) {
  bubble.node.dataset.status = status;
  const line = bubble.node.querySelector(".status-line");
  const words = STATUS_WORDS[status];
  line.hidden = !words;
  line.textContent = words || "";
  line.className = `status-line status-${status}`;
}

function setMeta(bubble, { tokens, cost, model, fallback, estimated }) {
  const meta = bubble.node.querySelector(".meta");
  const parts = [];
  if (tokens !== undefined && tokens !== null) parts.push(`${tokens} tokens${estimated ? " (estimated)" : ""}`);
  if (cost !== undefined && cost !== null && cost !== "") parts.push(`cost ${formatMoney(cost)}`);
  if (model) parts.push(model);
  if (fallback) parts.push("answered by the fallback model");
  meta.textContent = parts.join(" · ");
  meta.hidden = parts.length === 0;
}

function showFailure(bubble, code, detail, { retryable = true } = {}) {
  const box = bubble.node.querySelector(".failure");
  box.hidden = false;
  box.querySelector(".failure-text").textContent = FAILURE_WORDS[code] || FAILURE_WORDS.error;
  box.querySelector(".failure-detail").textContent = detail && detail !== FAILURE_WORDS[code] ? detail : "";
  box.querySelector(".retry").hidden = !(retryable && bubble.role === "assistant" && bubble.id !== null);
  bubble.node.classList.add("failed");
}

function clearFailure(bubble) {
  bubble.node.querySelector(".failure").hidden = true;
  bubble.node.classList.remove("failed");
}

function scrollDown() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

function updateStopButton() {
  el.stop.hidden = state.streaming.size === 0;
}

// --- server frames ------------------------------------------------------------------

function bubbleFor(frame, { create = true } = {}) {
  const id = frame.message;
  if (id !== undefined && id !== null && state.bubbles.has(String(id))) return state.bubbles.get(String(id));
  if (frame.conversation !== undefined && frame.conversation !== null && state.conversation !== null
      && String(frame.conversation) !== String(state.conversation)) return null;  // another conversation
  const waiting = state.pending.shift();
  if (waiting) {
    if (id !== undefined && id !== null) bindBubble(waiting, id);
    return waiting;
  }
  if (!create || id === undefined || id === null) return null;
  return createBubble("assistant", { id });
}

function onFrame(frame) {
  document.dispatchEvent(new CustomEvent("aiw:frame", { detail: frame }));
  switch (frame.type) {
    case "status": return onStatus(frame);
    case "delta": return onDelta(frame);
    case "done": return onDone(frame);
    case "error": return onError(frame);
    default: return undefined;
  }
}

function onStatus(frame) {
  if (state.conversation === null && frame.conversation !== undefined && frame.conversation !== null) {
    openedConversation(frame.conversation);
  }
  const bubble = bubbleFor(frame);
  if (!bubble) return;
  clearFailure(bubble);
  bubble.final = false;
  setStatus(bubble, frame.status);
  state.streaming.add(String(bubble.id));
  updateStopButton();
}

function onDelta(frame) {
  const bubble = bubbleFor(frame);
  if (!bubble || bubble.final) return;
  if (bubble.node.dataset.status !== "generating") setStatus(bubble, "generating");
  setText(bubble, bubble.text + (frame.content || ""));
}

function onDone(frame) {
  const bubble = bubbleFor(frame);
  if (!bubble) return;
  bubble.final = true;
  state.streaming.delete(String(bubble.id));
  updateStopButton();
  setStatus(bubble, frame.status || "success");
  const usage = frame.usage || {};
  setMeta(bubble, { tokens: usage.total_tokens, cost: frame.cost, model: frame.model, fallback: frame.fallback,
                    estimated: usage.estimated });
  if (frame.status && frame.status !== "success") showFailure(bubble, frame.status, "", { retryable: true });
  loadConversations();
}

function onError(frame) {
  const bubble = bubbleFor(frame, { create: true });
  if (!bubble) {
    notice(FAILURE_WORDS[frame.code] || frame.message_text || FAILURE_WORDS.error);
    return;
  }
  // A failed reply with a code we don't name came from the model layer (upstream_error, bad_request, ...).
  let code = FAILURE_WORDS[frame.code] ? frame.code : "llm_error";
  if (bubble.interrupted && code === "cancelled") code = "connection_lost";
  bubble.final = true;
  if (bubble.id !== null) state.streaming.delete(String(bubble.id));
  updateStopButton();
  setStatus(bubble, code);
  // Failed replies always offer a retry: a low balance can be topped up, a refused text reworded.
  const wait = frame.retry_after ? ` Try again in ${frame.retry_after} s.` : "";
  showFailure(bubble, code, (frame.message_text || "") + wait);
}

function notice(text) {
  hideHint();
  const node = document.createElement("p");
  node.className = "notice";
  node.textContent = text;
  el.messages.appendChild(node);
  scrollDown();
}

// --- actions ---------------------------------------------------------------------------

const socket = new ChatSocket({
  onFrame,
  onState: (status) => {
    el.connection.dataset.state = status;
    el.connection.textContent = { open: "connected", connecting: "connecting…", closed: "reconnecting…" }[status];
    if (status === "closed") {
      // Replies streaming on the lost socket are stopped by the server; say so, keep their text.
      for (const bubble of [...state.pending, ...[...state.streaming].map((id) => state.bubbles.get(id))]) {
        if (!bubble || bubble.final) continue;
        bubble.interrupted = true;
        setStatus(bubble, "reconnecting");
      }
    }
  },
  onReopen: () => {
    // After a dropped socket: follow the open conversation again and fill in whatever was missed.
    if (state.conversation !== null) {
      socket.send({ type: "subscribe", conversation: state.conversation });
      reconcile(state.conversation);
    }
  },
});

function sendMessage(content) {
  const agent = el.agent.value;
  if (!agent) { notice("No agent is available."); return; }
  createBubble("user", { text: content });
  const placeholder = createBubble("assistant");
  setStatus(placeholder, "pending");
  state.pending.push(placeholder);
  const frame = { type: "message", conversation: state.conversation, agent, content, client_id: uuid() };
  // An empty screen is a new conversation: ask for one explicitly, or the server's 5-minute dedupe would
  // continue the last one with this agent. Only the first message does: those sent before its conversation
  // id arrives join the one it started (through that dedupe).
  if (state.conversation === null && state.startNew) frame.new = true;
  state.startNew = false;
  socket.send(frame);
}

function stop() {
  if (state.conversation === null) return;
  socket.send({ type: "cancel", conversation: state.conversation });
  for (const id of state.streaming) {
    const bubble = state.bubbles.get(id);
    if (bubble) bubble.node.querySelector(".status-line").textContent = "Stopping…";
  }
}

// A retry is a new reply (the failed one stays in the history), generated in the REST call itself.
async function retry(bubble) {
  if (bubble.id === null || state.conversation === null) return;
  const conversation = state.conversation;
  bubble.node.querySelector(".retry").hidden = true;
  const fresh = createBubble("assistant");
  setStatus(fresh, "thinking");
  try {
    const data = await api(`/api/conversations/${conversation}/messages/${bubble.id}/retry/`,
                           { method: "POST", timeoutMs: 300000 });
    if (String(conversation) !== String(state.conversation)) return;
    bindBubble(fresh, data.id);
    applyMessage(fresh, data);
    loadConversations();
  } catch (err) {
    const details = err.details || {};
    if (details.message_id !== undefined && details.message_id !== null) bindBubble(fresh, details.message_id);
    else bubble.node.querySelector(".retry").hidden = false;  // nothing new was made: retry the old one again
    fresh.final = true;
    const code = details.status || err.code || "error";
    setStatus(fresh, code);
    showFailure(fresh, code, err.message);
  }
}

function openedConversation(id) {
  state.conversation = id;
  const url = new URL(window.location.href);
  url.searchParams.set("c", id);
  window.history.replaceState(null, "", url);
  socket.send({ type: "subscribe", conversation: id });
  highlightConversation();
}

// --- conversations ------------------------------------------------------------------------

function messageTokens(m) {
  if (m.total_tokens !== undefined) return m.total_tokens;
  if (m.usage && m.usage.total_tokens !== undefined) return m.usage.total_tokens;
  return (m.prompt_tokens || 0) + (m.completion_tokens || 0);
}

function applyMessage(bubble, m) {
  // While a reply is in progress, the text on screen (fed by deltas) may be ahead of the stored one: keep it.
  const inProgress = m.status === "processing" || m.status === "pending";
  if (m.content !== undefined && (!inProgress || bubble.text === "" || (m.content || "").length > bubble.text.length)) {
    setText(bubble, m.content || "");
  }
  if (m.role === "assistant") {
    if (m.status === "success") {
      bubble.final = true;
      state.streaming.delete(String(bubble.id));
      setStatus(bubble, "success");
      clearFailure(bubble);
      setMeta(bubble, { tokens: messageTokens(m), cost: m.cost, model: m.model_name || m.model, fallback: m.fallback,
                        estimated: m.usage_estimated });
    } else if (FINAL_FAILURES.has(m.status)) {
      bubble.final = true;
      state.streaming.delete(String(bubble.id));
      let code = FAILURE_WORDS[m.error_code] ? m.error_code : m.status;
      if (bubble.interrupted && code === "cancelled") code = "connection_lost";
      setStatus(bubble, code);
      showFailure(bubble, code, m.error_display || m.error_message || "");
    } else {
      setStatus(bubble, m.status === "pending" ? "pending" : "thinking");
    }
  }
  updateStopButton();
}

async function fetchMessages(id) {
  return results(await api(`/api/conversations/${id}/messages/?limit=500`));
}

async function openConversation(id) {
  state.conversation = id;
  state.bubbles.clear();
  state.pending = [];
  state.streaming.clear();
  el.messages.replaceChildren();
  highlightConversation();
  socket.send({ type: "subscribe", conversation: id });
  try {
    for (const m of await fetchMessages(id)) {
      if (m.role === "system") continue;
      applyMessage(createBubble(m.role, { id: m.id, text: m.content || "" }), m);
    }
    const conv = state.conversations.find((c) => String(c.id) === String(id));
    const slug = conv && (conv.agent_slug || (conv.agent && conv.agent.slug) || conv.agent);
    if (slug && agents.some((a) => a.slug === slug)) el.agent.value = slug;
  } catch (err) {
    notice(`Could not load this conversation: ${err.message}`);
  }
  updateStopButton();
}

// Merge the server's view into the screen without clearing it (after a reconnect). A reply the server still
// shows in progress is read again until it is final: its last frames may have gone to the lost socket.
async function reconcile(id, tries = RECONCILE_POLL_TRIES) {
  let messages;
  try { messages = await fetchMessages(id); } catch { messages = null; }
  if (String(id) !== String(state.conversation)) return;
  if (messages === null) {
    if (tries > 0) setTimeout(() => reconcile(id, tries - 1), RECONCILE_POLL_MS);
    return;
  }
  for (const m of messages) {
    if (m.role === "system") continue;
    let bubble = state.bubbles.get(String(m.id));
    if (!bubble && m.role === "assistant" && state.pending.length) {
      bubble = state.pending.shift();
      bindBubble(bubble, m.id);
    }
    if (!bubble && m.role === "user") {
      // The user's own bubble was drawn before it had an id: match it by text.
      bubble = [...el.messages.querySelectorAll("article.message.user:not([data-message-id])")]
        .map((node) => ({ node })).find((b) => b.node.querySelector(".content").textContent.trim()
          === (m.content || "").trim());
      if (bubble) { bubble.node.dataset.messageId = String(m.id); continue; }
    }
    if (!bubble) bubble = createBubble(m.role, { id: m.id, text: m.content || "" });
    applyMessage(bubble, m);
  }
  const unfinished = messages.some((m) => m.role === "assistant" && (m.status === "processing" || m.status === "pending")
    && !(state.bubbles.get(String(m.id)) || {}).final);
  if (unfinished && tries > 0) setTimeout(() => reconcile(id, tries - 1), RECONCILE_POLL_MS);
}

async function loadConversations() {
  try {
    const data = await api("/api/conversations/?limit=100");
    state.conversations = results(data).filter((c) => c.has_success !== false);
  } catch {
    return;
  }
  el.list.replaceChildren();
  for (const c of state.conversations) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "conversation";
    button.dataset.conversationId = String(c.id);
    button.textContent = c.title || `Conversation ${c.id}`;
    button.addEventListener("click", () => openConversation(c.id));
    li.appendChild(button);
    el.list.appendChild(li);
  }
  highlightConversation();
}

function highlightConversation() {
  for (const button of el.list.querySelectorAll("button.conversation")) {
    button.classList.toggle("active", button.dataset.conversationId === String(state.conversation));
  }
}

function newConversation() {
  state.conversation = null;
  state.startNew = true;
  state.bubbles.clear();
  state.pending = [];
  state.streaming.clear();
  el.messages.replaceChildren();
  if (el.hint) { el.hint.hidden = false; el.messages.appendChild(el.hint); }
  const url = new URL(window.location.href);
  url.searchParams.delete("c");
  window.history.replaceState(null, "", url);
  highlightConversation();
  updateStopButton();
  el.input.focus();
}

// --- wiring ----------------------------------------------------------------------------

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const content = el.input.value.trim();
  if (!content) return;
  el.input.value = "";
  sendMessage(content);
});
el.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});
el.stop.addEventListener("click", stop);
el.newConversation.addEventListener("click", newConversation);

const initial = new URL(window.location.href).searchParams.get("c");
socket.connect();
loadConversations().then(() => { if (initial) openConversation(initial); });
window.aiwChat = { state, socket };  // for debugging and the browser tests
