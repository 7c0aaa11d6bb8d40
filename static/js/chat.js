// The chat page: conversations over REST, replies streamed over the /ws/chat/ websocket.
// The socket reconnects by itself; what is on screen is kept and reconciled with the server afterwards.
// A reply keeps generating on the server when the socket goes away (only Stop cancels it): a reconnected or
// reloaded page shows the text so far and follows the rest.

import { api, readJsonScript, results } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { formatMoney } from "./money.js";
import { ChatSocket } from "./socket.js";

const config = readJsonScript("page-config", { currency: "", max_chars: 32000 });
const agents = readJsonScript("agents-data", []);
const MAX_CHARS = Number(config.max_chars) || 32000;

const el = {
  layout: document.querySelector(".chat-layout"),
  agent: document.getElementById("agent-select"),
  agentName: document.getElementById("agent-name"),
  connection: document.getElementById("connection"),
  list: document.getElementById("conversation-list"),
  search: document.getElementById("conversation-search"),
  messages: document.getElementById("messages"),
  hint: document.getElementById("empty-hint"),
  form: document.getElementById("composer"),
  input: document.getElementById("message-input"),
  counter: document.getElementById("char-count"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  newConversation: document.getElementById("new-conversation"),
  sidebarToggle: document.getElementById("sidebar-toggle"),
  jump: document.getElementById("jump-latest"),
};

// Plain words for failed replies, by error code or message status. Said once: the server's own sentence is
// shown only for codes we have no words for.
const FAILURE_WORDS = {
  insufficient_balance: config.is_staff
    ? "Your balance is too low for this reply. Add credit in the admin, then retry."
    : "Your balance is too low for this reply. Ask your administrator for more credit, then retry.",
  quota_exceeded: "You have used this month's quota.",
  key_budget_exceeded: "This key's monthly budget is used up.",
  content_violation: "This message was refused by the content rules.",
  content_refused: "This message was refused by the content rules.",
  moderation: "This message was refused by the content rules.",
  rate_limited: "Too many requests right now. Wait a moment and retry.",
  too_many_conversations: "Too many replies are running at once. Wait for one to finish.",
  conversation_busy: "This conversation is still answering. Wait for it to finish.",
  message_too_long: `This message is too long: at most ${MAX_CHARS.toLocaleString("en-US")} characters.`,
  context_length_exceeded: "This message is too long for this model's context window. Shorten it, then retry.",
  upstream_timeout: "The model took too long to answer (model error).",
  no_healthy_deployment: "No model is available right now (model error).",
  llm_error: "The model failed to answer (model error).",
  error: "Something went wrong with this reply.",
  interrupted: "The reply was interrupted. Retry to get a full reply.",
  internal_error: "Something went wrong on the server. Retry in a moment.",
  cancelled: "Stopped.",
};
const STATUS_WORDS = { thinking: "Thinking…", generating: "Generating…", pending: "Waiting…", processing: "Thinking…",
                       reconnecting: "Connection lost, reconnecting…" };
// While the server shows a reply in progress that this page did not see start (a reload, a reconnect), it is
// re-read this often until final: its frames may have gone to a socket that no longer exists.
const RECONCILE_POLL_MS = 1000;
const RECONCILE_POLL_TRIES = 600;
const FINAL_FAILURES = new Set(["error", "insufficient_balance", "content_violation", "llm_error"]);
const EXAMPLES = [
  "Explain the difference between a process and a thread, with a table.",
  "Write a Python function that checks whether a string is a palindrome.",
  "Draft a short, friendly email asking to move a meeting to Thursday.",
  "Summarize the main ideas of stoicism in five bullet points.",
];

const state = {
  conversation: null,           // id of the open conversation (null: a new one)
  conversationData: null,       // its row from the API (agent, title)
  startNew: true,               // the next message starts a new conversation ("new": true, no server dedupe)
  bubbles: new Map(),           // message id -> bubble
  pending: [],                  // assistant bubbles waiting for their message id (first status frame)
  streaming: new Set(),         // message ids being generated
  conversations: [],
  follow: true,                 // keep the newest text in view (false once the user scrolls up)
  polling: false,
  loading: false,               // a conversation's messages are being read
};

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function money(value) { return formatMoney(value, config.currency); }

// --- bubbles ----------------------------------------------------------------------

function hideHint() { if (el.hint) el.hint.hidden = true; }

function createBubble(role, { id = null, text = "" } = {}) {
  hideHint();
  const node = document.createElement("article");
  node.className = `message ${role}`;
  node.innerHTML = `<div class="role"></div><div class="status-line" hidden></div><div class="content"></div>
    <div class="meta" hidden></div><div class="failure" hidden><span class="failure-text"></span>
    <small class="failure-detail"></small><button type="button" class="retry">Retry</button></div>
    <div class="actions"><button type="button" class="copy" title="Copy the text">Copy</button></div>`;
  node.querySelector(".role").textContent = role === "user" ? "You" : "Assistant";
  const actions = node.querySelector(".actions");
  if (role === "user") {
    const edit = document.createElement("button");
    edit.type = "button"; edit.className = "edit"; edit.textContent = "Edit"; edit.title = "Edit and send again";
    actions.appendChild(edit);
  } else {
    const again = document.createElement("button");
    again.type = "button"; again.className = "regenerate"; again.textContent = "Regenerate";
    again.title = "Ask the same question again";
    actions.appendChild(again);
  }
  el.messages.appendChild(node);
  const bubble = { id, role, node, text, renderQueued: false, final: false };
  node.querySelector(".retry").addEventListener("click", () => retry(bubble));
  node.querySelector(".copy").addEventListener("click", (e) => copyText(bubble.text, e.currentTarget));
  const edit = node.querySelector(".edit");
  if (edit) edit.addEventListener("click", () => editAndResend(bubble));
  const again = node.querySelector(".regenerate");
  if (again) again.addEventListener("click", () => regenerate(bubble));
  if (id !== null) bindBubble(bubble, id);
  setText(bubble, text);
  return bubble;
}

function bindBubble(bubble, id) {
  bubble.id = id;
  bubble.node.dataset.messageId = String(id);
  state.bubbles.set(String(id), bubble);
}

function render(bubble) {
  const content = bubble.node.querySelector(".content");
  if (bubble.role === "user") {
    content.textContent = bubble.text;  // what the user typed, as typed
  } else {
    content.innerHTML = renderMarkdown(bubble.text);
    for (const head of content.querySelectorAll(".code-head")) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy-code";
      button.textContent = "Copy code";
      head.appendChild(button);
    }
  }
  keepInView();
}

function setText(bubble, text) {
  bubble.text = text;
  if (bubble.renderQueued) return;
  bubble.renderQueued = true;
  // Re-render at most once per frame while deltas pour in.
  requestAnimationFrame(() => {
    bubble.renderQueued = false;
    render(bubble);
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
  if (cost !== undefined && cost !== null && cost !== "") parts.push(`cost ${money(cost)}`);
  if (model) parts.push(model);
  if (fallback) parts.push("answered by the fallback model");
  meta.textContent = parts.join(" · ");
  meta.hidden = parts.length === 0;
}

function showFailure(bubble, code, detail, { retryable = true } = {}) {
  const box = bubble.node.querySelector(".failure");
  box.hidden = false;
  const words = FAILURE_WORDS[code];
  box.querySelector(".failure-text").textContent = words || detail || FAILURE_WORDS.error;
  // The server's sentence only adds something when we had no words of our own (or a wait time).
  box.querySelector(".failure-detail").textContent = words ? "" : "";
  if (detail && words && /Try again in \d+ s\./.test(detail)) {
    box.querySelector(".failure-detail").textContent = detail.match(/Try again in \d+ s\./)[0];
  }
  box.querySelector(".retry").hidden = !(retryable && bubble.role === "assistant" && bubble.id !== null);
  bubble.node.classList.add("failed");
}

function clearFailure(bubble) {
  bubble.node.querySelector(".failure").hidden = true;
  bubble.node.classList.remove("failed");
}

// The list scrolls, not the page; it follows new text unless the user scrolled up to read.
function atBottom() {
  return el.messages.scrollHeight - el.messages.scrollTop - el.messages.clientHeight < 40;
}

function keepInView() {
  if (state.follow) el.messages.scrollTop = el.messages.scrollHeight;
  if (el.jump) el.jump.hidden = state.follow || atBottom();
}

function scrollDown() {
  state.follow = true;
  el.messages.scrollTop = el.messages.scrollHeight;
  if (el.jump) el.jump.hidden = true;
}

function busy() {
  return state.pending.length > 0 || state.streaming.size > 0;
}

function updateButtons() {
  el.stop.hidden = state.streaming.size === 0 && state.pending.length === 0;
  const length = el.input.value.length;
  const tooLong = length > MAX_CHARS;
  el.counter.textContent = `${length.toLocaleString("en-US")} / ${MAX_CHARS.toLocaleString("en-US")}`;
  el.counter.classList.toggle("over", tooLong);
  el.counter.title = tooLong ? FAILURE_WORDS.message_too_long : "";
  el.form.classList.toggle("too-long", tooLong);
  // One reply at a time per conversation: Send waits for the running one (its text stays in the box).
  el.send.disabled = busy() || tooLong || !el.input.value.trim();
  el.send.title = busy() ? "Wait for the reply to finish (or Stop it)" : "";
  el.agent.disabled = state.conversation !== null;
}

function copyText(text, button) {
  const done = () => {
    const before = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = before; }, 1200);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else {
    fallbackCopy(text, done);
  }
}

function fallbackCopy(text, done) {
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  try { document.execCommand("copy"); } catch { /* nothing else to try */ }
  area.remove();
  window.__lastCopied = text;  // for the tests (headless clipboards are not readable)
  done();
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
  // While a conversation's messages load, frames of a reply not drawn yet wait for it (the load draws it).
  if (!create || id === undefined || id === null || state.loading) return null;
  const bubble = createBubble("assistant", { id });
  bubble.resumed = true;
  return bubble;
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
  updateButtons();
}

function onDelta(frame) {
  const bubble = bubbleFor(frame);
  if (!bubble || bubble.final) return;
  if (bubble.id !== null) state.streaming.add(String(bubble.id));
  if (bubble.node.dataset.status !== "generating") setStatus(bubble, "generating");
  setText(bubble, bubble.text + (frame.content || ""));
  updateButtons();
}

function onDone(frame) {
  const bubble = bubbleFor(frame);
  if (!bubble) return;
  bubble.final = true;
  // A reply followed from the middle (reload, reconnect) may have missed frames: show the stored text first.
  if (bubble.resumed && state.conversation !== null) {
    bubble.resumed = false;
    refreshBubble(bubble).then(() => finishDone(bubble, frame));
    return;
  }
  finishDone(bubble, frame);
}

function finishDone(bubble, frame) {
  state.streaming.delete(String(bubble.id));
  setStatus(bubble, frame.status || "success");
  const usage = frame.usage || {};
  setMeta(bubble, { tokens: usage.total_tokens, cost: frame.cost, model: frame.model, fallback: frame.fallback,
                    estimated: usage.estimated });
  if (frame.status && frame.status !== "success") showFailure(bubble, frame.status, "", { retryable: true });
  updateButtons();
  loadConversations();
}

async function refreshBubble(bubble) {
  try {
    const m = await api(`/api/conversations/${state.conversation}/messages/?limit=500`);
    const found = results(m).find((x) => String(x.id) === String(bubble.id));
    if (found) {
      bubble.text = found.content || "";
      render(bubble);
    }
  } catch { /* the streamed text stays */ }
}

function onError(frame) {
  const hasReply = frame.message !== undefined && frame.message !== null;
  const bubble = bubbleFor(frame, { create: true });
  if (!bubble) {
    notice(FAILURE_WORDS[frame.code] || frame.message_text || FAILURE_WORDS.error);
    return;
  }
  if (!hasReply && bubble.id === null) {
    refused(bubble, frame);
    return;
  }
  // A failed reply with a code we don't name came from the model layer (upstream_error, bad_request, ...).
  const code = FAILURE_WORDS[frame.code] ? frame.code : "llm_error";
  bubble.final = true;
  if (bubble.id !== null) state.streaming.delete(String(bubble.id));
  updateButtons();
  setStatus(bubble, code);
  // Failed replies always offer a retry: a low balance can be topped up, a refused text reworded.
  const wait = frame.retry_after ? ` Try again in ${frame.retry_after} s.` : "";
  showFailure(bubble, code, FAILURE_WORDS[code] ? wait.trim() : (frame.message_text || "") + wait);
  loadConversations();
}

// The server refused the message before storing a reply (busy, too long, rate limited…): nothing of it
// stays on screen as sent, and its text goes back into the box so it is never lost.
function refused(placeholder, frame) {
  if (placeholder.userBubble) placeholder.userBubble.node.remove();
  placeholder.node.remove();
  const text = placeholder.sent || "";
  if (text && !el.input.value.includes(text)) el.input.value = el.input.value ? `${text}\n${el.input.value}` : text;
  const words = FAILURE_WORDS[frame.code] || frame.message_text || FAILURE_WORDS.error;
  const wait = frame.retry_after ? ` Try again in ${frame.retry_after} s.` : "";
  notice(`Not sent: ${words}${wait} Your text is back in the box.`);
  if (!el.messages.querySelector("article.message") && state.conversation === null) {
    state.startNew = true;
    if (el.hint) el.hint.hidden = false;
  }
  updateButtons();
}

function notice(text) {
  const node = document.createElement("p");
  node.className = "notice";
  node.setAttribute("role", "status");
  node.textContent = text;
  el.messages.appendChild(node);
  keepInView();
}

// --- actions ---------------------------------------------------------------------------

const socket = new ChatSocket({
  onFrame,
  onState: (status) => {
    el.connection.dataset.state = status;
    el.connection.textContent = { open: "connected", connecting: "connecting…", closed: "reconnecting…" }[status];
    if (status === "closed") {
      // The server keeps generating; say the connection is back soon, keep the text.
      for (const bubble of [...state.pending, ...[...state.streaming].map((id) => state.bubbles.get(id))]) {
        if (!bubble || bubble.final) continue;
        bubble.resumed = true;
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
  const agent = state.conversationData ? state.conversationData.agent : el.agent.value;
  if (!agent && state.conversation === null) { notice("No agent is available."); return false; }
  const userBubble = createBubble("user", { text: content });
  const placeholder = createBubble("assistant");
  placeholder.sent = content;
  placeholder.userBubble = userBubble;
  setStatus(placeholder, "pending");
  state.pending.push(placeholder);
  const frame = { type: "message", conversation: state.conversation, agent, content, client_id: uuid() };
  // An empty screen is a new conversation: ask for one explicitly, or the server's 5-minute dedupe would
  // continue the last one with this agent. Only the first message does: those sent before its conversation
  // id arrives join the one it started (through that dedupe).
  if (state.conversation === null && state.startNew) frame.new = true;
  state.startNew = false;
  scrollDown();
  socket.send(frame);
  updateButtons();
  return true;
}

function stop() {
  if (state.conversation === null) return;
  socket.send({ type: "cancel", conversation: state.conversation });
  for (const id of state.streaming) {
    const bubble = state.bubbles.get(id);
    if (bubble) bubble.node.querySelector(".status-line").textContent = "Stopping…";
  }
}

// A retry is a new reply (the failed one stays in the history). The REST call generates it and its frames
// come to this page through the conversation's group, so it streams like any reply.
async function retry(bubble) {
  if (bubble.id === null || state.conversation === null || busy()) return;
  const conversation = state.conversation;
  bubble.node.querySelector(".retry").hidden = true;
  const fresh = createBubble("assistant");
  setStatus(fresh, "thinking");
  state.pending.push(fresh);
  scrollDown();
  updateButtons();
  try {
    const data = await api(`/api/conversations/${conversation}/messages/${bubble.id}/retry/`,
                           { method: "POST", timeoutMs: 300000 });
    if (String(conversation) !== String(state.conversation)) return;
    state.pending = state.pending.filter((b) => b !== fresh);
    if (fresh.id === null) bindBubble(fresh, data.id);
    applyMessage(fresh, data);
    loadConversations();
  } catch (err) {
    state.pending = state.pending.filter((b) => b !== fresh);
    const details = err.details || {};
    if (details.message_id !== undefined && details.message_id !== null) {
      if (fresh.id === null) bindBubble(fresh, details.message_id);
    } else {
      bubble.node.querySelector(".retry").hidden = false;  // nothing new was made: retry the old one again
    }
    fresh.final = true;
    if (fresh.id !== null) state.streaming.delete(String(fresh.id));
    const code = FAILURE_WORDS[err.code] ? err.code : (details.status || "error");
    setStatus(fresh, code);
    showFailure(fresh, code, err.message);
  }
  updateButtons();
}

function editAndResend(bubble) {
  el.input.value = bubble.text;
  el.input.focus();
  el.input.setSelectionRange(el.input.value.length, el.input.value.length);
  updateButtons();
}

function regenerate(bubble) {
  // Ask the question this reply answered again, as a new message (the old reply stays in the history).
  if (busy()) return;
  let node = bubble.node.previousElementSibling;
  while (node && !(node.matches("article.message.user"))) node = node.previousElementSibling;
  if (!node) return;
  sendMessage(node.querySelector(".content").textContent);
}

function openedConversation(id) {
  state.conversation = id;
  const url = new URL(window.location.href);
  url.searchParams.set("c", id);
  window.history.replaceState({ c: String(id) }, "", url);
  socket.send({ type: "subscribe", conversation: id });
  loadConversationData(id);
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
    if ((m.content || "") !== bubble.text) setText(bubble, m.content || "");
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
      const code = FAILURE_WORDS[m.error_code] ? m.error_code : m.status;
      setStatus(bubble, code);
      showFailure(bubble, code, m.error_display || m.error_message || "");
    } else {
      // Generating on the server (maybe started by a socket that is gone): follow it.
      bubble.resumed = true;
      bubble.final = false;
      state.streaming.add(String(bubble.id));
      if (bubble.node.dataset.status !== "generating") setStatus(bubble, m.content ? "generating" : "thinking");
    }
  }
  updateButtons();
}

async function fetchMessages(id) {
  return results(await api(`/api/conversations/${id}/messages/?limit=500`));
}

async function loadConversationData(id) {
  try {
    const data = await api(`/api/conversations/${id}/`);
    if (String(id) !== String(state.conversation)) return;
    state.conversationData = data;
    showAgent();
  } catch { /* the list entry, if any, is enough */ }
}

// Inside a conversation its agent is fixed (the server keeps the one it started with): show it, lock the picker.
function showAgent() {
  const slug = state.conversationData && state.conversationData.agent;
  if (slug) {
    if (![...el.agent.options].some((o) => o.value === slug)) {
      const option = document.createElement("option");
      option.value = slug;
      option.textContent = slug;
      el.agent.appendChild(option);
    }
    el.agent.value = slug;
  }
  const agent = agents.find((a) => a.slug === slug);
  if (el.agentName) el.agentName.textContent = slug ? `Agent: ${agent ? agent.name : slug}` : "";
  updateButtons();
}

function resetScreen() {
  state.bubbles.clear();
  state.pending = [];
  state.streaming.clear();
  state.follow = true;
  el.messages.replaceChildren();
}

async function openConversation(id, { push = true } = {}) {
  state.conversation = id;
  state.conversationData = state.conversations.find((c) => String(c.id) === String(id)) || null;
  state.startNew = false;
  resetScreen();
  showAgent();
  closeSidebar();
  if (push) {
    const url = new URL(window.location.href);
    if (url.searchParams.get("c") !== String(id)) {
      url.searchParams.set("c", id);
      window.history.pushState({ c: String(id) }, "", url);
    }
  }
  highlightConversation();
  socket.send({ type: "subscribe", conversation: id });
  loadConversationData(id);
  state.loading = true;
  try {
    const messages = await fetchMessages(id);
    if (String(id) !== String(state.conversation)) return;
    for (const m of messages) {
      if (m.role === "system") continue;
      applyMessage(state.bubbles.get(String(m.id)) || createBubble(m.role, { id: m.id, text: m.content || "" }), m);
    }
    scrollDown();
    pollUnfinished(id);
  } catch (err) {
    notice(`Could not load this conversation: ${err.message}`);
  } finally {
    if (String(id) === String(state.conversation)) state.loading = false;
  }
  updateButtons();
}

function pollUnfinished(id) {
  const unfinished = [...state.streaming].some((mid) => (state.bubbles.get(mid) || {}).resumed);
  if (unfinished && !state.polling) {
    state.polling = true;
    setTimeout(() => { state.polling = false; reconcile(id); }, RECONCILE_POLL_MS);
  }
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
      // The user's own bubble was drawn before it had an id: match it by text, and remember it by id.
      const node = [...el.messages.querySelectorAll("article.message.user:not([data-message-id])")]
        .find((n) => n.querySelector(".content").textContent.trim() === (m.content || "").trim());
      if (node) {
        node.dataset.messageId = String(m.id);
        state.bubbles.set(String(m.id), { id: m.id, role: "user", node, text: m.content || "", final: true });
        continue;
      }
    }
    if (!bubble) bubble = createBubble(m.role, { id: m.id, text: m.content || "" });
    if (m.role === "user") continue;
    applyMessage(bubble, m);
  }
  const unfinished = messages.some((m) => m.role === "assistant" && (m.status === "processing" || m.status === "pending")
    && !(state.bubbles.get(String(m.id)) || {}).final);
  if (unfinished && tries > 0) setTimeout(() => reconcile(id, tries - 1), RECONCILE_POLL_MS);
  updateButtons();
}

function dayText(value) {
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return "";
  const today = new Date();
  if (d.toDateString() === today.toDateString()) {
    return d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  }
  return d.toLocaleDateString(undefined, { year: d.getFullYear() === today.getFullYear() ? undefined : "numeric",
                                           month: "short", day: "numeric" });
}

async function loadConversations() {
  const q = el.search ? el.search.value.trim() : "";
  let data;
  try {
    data = await api(`/api/conversations/?limit=100&include_failed=true${q ? `&q=${encodeURIComponent(q)}` : ""}`);
  } catch {
    return;
  }
  if (el.search && el.search.value.trim() !== q) return;  // a newer search is on its way
  state.conversations = results(data);
  el.list.replaceChildren();
  for (const c of state.conversations) el.list.appendChild(conversationItem(c));
  if (!state.conversations.length) {
    const li = document.createElement("li");
    li.className = "muted empty-list";
    li.textContent = q ? "No conversation matches." : "No conversations yet.";
    el.list.appendChild(li);
  }
  highlightConversation();
}

function conversationItem(c) {
  const li = document.createElement("li");
  li.className = "conversation-item";
  li.dataset.conversationId = String(c.id);
  const button = document.createElement("button");
  button.type = "button";
  button.className = "conversation";
  button.dataset.conversationId = String(c.id);
  const title = document.createElement("span");
  title.className = "title";
  title.textContent = c.title || `Conversation ${c.id}`;
  const info = document.createElement("span");
  info.className = "info";
  const agent = agents.find((a) => a.slug === c.agent);
  info.textContent = [dayText(c.updated_at), agent ? agent.name : c.agent].filter(Boolean).join(" · ");
  if (!c.has_success) {
    const tag = document.createElement("span");
    tag.className = "tag";
    tag.textContent = "no reply";
    info.append(" ", tag);
  }
  button.append(title, info);
  button.addEventListener("click", () => openConversation(c.id));
  const rename = document.createElement("button");
  rename.type = "button";
  rename.className = "rename icon";
  rename.title = "Rename";
  rename.setAttribute("aria-label", "Rename");
  rename.textContent = "✎";
  rename.addEventListener("click", () => startRename(li, c));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "delete icon";
  remove.title = "Delete";
  remove.setAttribute("aria-label", "Delete");
  remove.textContent = "🗑";
  remove.addEventListener("click", () => deleteConversation(c));
  li.append(button, rename, remove);
  return li;
}

function startRename(li, c) {
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.maxLength = 200;
  input.value = c.title || "";
  input.setAttribute("aria-label", "New title");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let finished = false;
  const finish = async (save) => {
    if (finished) return;
    finished = true;
    if (save && input.value.trim() !== (c.title || "")) {
      try {
        await api(`/api/conversations/${c.id}/`, { method: "PATCH", body: { title: input.value.trim() } });
      } catch (err) {
        notice(`Could not rename: ${err.message}`);
      }
    }
    loadConversations();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(c) {
  // eslint-disable-next-line no-alert
  if (!window.confirm(`Delete "${c.title || `Conversation ${c.id}`}"? This cannot be undone.`)) return;
  try {
    await api(`/api/conversations/${c.id}/`, { method: "DELETE" });
  } catch (err) {
    notice(`Could not delete: ${err.message}`);
    return;
  }
  if (String(c.id) === String(state.conversation)) newConversation();
  loadConversations();
}

function highlightConversation() {
  for (const button of el.list.querySelectorAll("button.conversation")) {
    button.classList.toggle("active", button.dataset.conversationId === String(state.conversation));
  }
}

function showWelcome() {
  if (!el.hint) return;
  el.hint.hidden = false;
  el.messages.appendChild(el.hint);
}

function newConversation({ push = true } = {}) {
  state.conversation = null;
  state.conversationData = null;
  state.startNew = true;
  resetScreen();
  showWelcome();
  if (push) {
    const url = new URL(window.location.href);
    if (url.searchParams.has("c")) {
      url.searchParams.delete("c");
      window.history.pushState({ c: null }, "", url);
    }
  }
  if (el.agentName) el.agentName.textContent = "";
  highlightConversation();
  closeSidebar();
  updateButtons();
  el.input.focus();
}

function closeSidebar() { el.layout.classList.remove("sidebar-open"); }

// --- wiring ----------------------------------------------------------------------------

function submit() {
  const content = el.input.value;
  if (!content.trim() || busy() || content.length > MAX_CHARS) { updateButtons(); return; }
  if (sendMessage(content.trim())) el.input.value = "";
  updateButtons();
}

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
el.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
el.input.addEventListener("input", updateButtons);
el.stop.addEventListener("click", stop);
el.newConversation.addEventListener("click", () => newConversation());
el.messages.addEventListener("scroll", () => {
  state.follow = atBottom();
  if (el.jump) el.jump.hidden = state.follow;
});
if (el.jump) el.jump.addEventListener("click", scrollDown);
el.messages.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy-code");
  if (!button) return;
  const code = button.closest(".code-block").querySelector("pre code");
  copyText(code ? code.textContent : "", button);
});
if (el.sidebarToggle) {
  el.sidebarToggle.addEventListener("click", () => el.layout.classList.toggle("sidebar-open"));
}
let searchTimer = null;
if (el.search) {
  el.search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(loadConversations, 250);
  });
}
for (const [i, text] of EXAMPLES.entries()) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "example-prompt";
  button.dataset.example = String(i);
  button.textContent = text;
  button.addEventListener("click", () => { el.input.value = text; updateButtons(); el.input.focus(); });
  const box = document.getElementById("examples");
  if (box) box.appendChild(button);
}
el.agent.addEventListener("change", () => {
  const agent = agents.find((a) => a.slug === el.agent.value);
  if (el.agentName && state.conversation === null) el.agentName.textContent = "";
  if (agent) el.agent.title = agent.name;
});
// Back and Forward move between conversations as the address bar says.
window.addEventListener("popstate", () => {
  const c = new URL(window.location.href).searchParams.get("c");
  if (c) openConversation(c, { push: false });
  else newConversation({ push: false });
});

const initial = new URL(window.location.href).searchParams.get("c");
socket.connect();
updateButtons();
loadConversations().then(() => { if (initial) openConversation(initial, { push: false }); });
window.aiwChat = { state, socket, sendMessage, updateButtons };  // for debugging and the browser tests
