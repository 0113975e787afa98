// chatstream_lite chat UI: plain JavaScript, no build step, no network access beyond this server.
//
// At start the page shows the session's history (GET /history) and, while the model loads,
// "Loading the model… NN %" from GET /health (Send waits for it). Send POSTs to /chat_stream
// and reads the text/plain body as it streams; Stop (or Escape) aborts that fetch (the server
// sees the client leave, stops generating and keeps the partial reply); Regenerate asks for a
// new last reply; Clear forgets the conversation on the server.
// Replies are Markdown, rendered by the vendored marked and sanitized by DOMPurify
// (static/vendor/); see "Markdown" below for why a reply can never run code in this page.
// With an API key on the server, a 401 shows a key field; the key is kept in this tab only
// (sessionStorage) and sent as "Authorization: Bearer <key>", the way other clients send it.
// No inline script or style anywhere: the server's Content-Security-Policy forbids them.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), empty: $("empty"), notice: $("notice"), model: $("model"),
  loading: $("loading"), loadingText: $("loading-text"), loadingBar: $("loading-bar"),
  form: $("composer"), input: $("input"),
  send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
  keyForm: $("key-form"), key: $("key"),
};
const KEY_ITEM = "chatstream_lite.api_key";

let controller = null;          // the AbortController of the reply being streamed, if any
let modelLoading = false;       // /health says the model is still loading: Send waits

// -- Markdown ------------------------------------------------------------------------------
// A reply is untrusted text. Raw HTML in it is escaped before Markdown is rendered (shown as
// the model wrote it, never parsed as HTML), images become links (no request leaves the page
// by itself), and what marked produces goes through DOMPurify with a short allow-list anyway:
// no script, no event handler, no javascript: link can reach the page, even through a bug in
// the renderer. Code blocks get a Copy button.

const escapeHtml = (text) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;")
  .replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");

const markdown = new marked.Marked({
  gfm: true,
  breaks: true,                 // a single newline is a line break, as the model meant it
  renderer: {
    html({ text, block }) {
      return block ? `<p class="raw">${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    image({ href, text }) {
      return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`;
    },
  },
});

const SANITIZE = {
  ALLOWED_TAGS: ["a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5",
                 "h6", "hr", "li", "ol", "p", "pre", "strong", "table", "tbody", "td", "th",
                 "thead", "tr", "ul"],
  ALLOWED_ATTR: ["href", "title", "align", "start", "class"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {   // a link opens elsewhere and tells it nothing about this page
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// What a render costs, for the browser test and anyone curious (window.chatstreamLite).
const renderStats = { renders: 0, ms: 0, maxMs: 0, chunks: 0 };

function renderMarkdown(text) {
  return clean(markdown.parse(text));
}

function clean(html) {
  const fragment = DOMPurify.sanitize(html, SANITIZE);
  for (const pre of fragment.querySelectorAll("pre")) {
    const box = document.createElement("div");
    box.className = "code";
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const language = document.createElement("span");
    language.textContent = /language-(\S+)/.exec(pre.firstElementChild?.className)?.[1] || "";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy the code");
    bar.append(language, copy);
    pre.replaceWith(box);
    box.append(bar, pre);
  }
  for (const table of fragment.querySelectorAll("table")) {
    const box = document.createElement("div");
    box.className = "table";      // scrolls sideways on a narrow screen, not the page
    table.replaceWith(box);
    box.append(table);
  }
  return fragment;
}

// A reply keeps its raw text on its element (`raw`) and is shown rendered. While it streams
// it is rendered at most once per animation frame however fast the pieces arrive, and only
// its changed tail: the text is split into top-level blocks (lexing is cheap), and the
// blocks already on screen with the same source are kept, so a frame costs about one
// paragraph's rendering, not the whole reply's. When it ends, the tail is rendered once more,
// and the whole reply only if it defines reference links (which may point back up).
function timed(bubble, render) {
  const follow = nearBottom();
  const started = performance.now();
  render(bubble.querySelector(".text"));
  const ms = performance.now() - started;
  renderStats.renders += 1;
  renderStats.ms += ms;
  renderStats.maxMs = Math.max(renderStats.maxMs, ms);
  if (follow) scrollDown();
}

// A reasoning model's reply opens with its thinking (`<think>...</think>`): that part is
// shown apart, above the answer, as plain text in a box that starts collapsed; only the
// answer is rendered as Markdown. A reply cut inside its thinking is all thinking.
const THINK_START = "<think>";
const THINK_END = "</think>";

function splitThinking(raw, streaming) {
  const start = raw.trimStart();
  if (!start.startsWith(THINK_START)) {
    if (streaming && start && THINK_START.startsWith(start)) return { thinking: null, answer: "" };
    return { thinking: null, answer: raw };
  }
  const end = start.indexOf(THINK_END);
  if (end < 0) return { thinking: start.slice(THINK_START.length), answer: "" };
  return { thinking: start.slice(THINK_START.length, end).trim(),
           answer: start.slice(end + THINK_END.length).trimStart() };
}

function showThinking(bubble, thinking) {
  let box = bubble.querySelector(":scope > details.thinking");
  if (thinking === null) {
    if (box) box.remove();
    return;
  }
  if (!box) {
    box = document.createElement("details");          // closed until the reader opens it
    box.className = "thinking";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const text = document.createElement("div");
    text.className = "thinking-text";
    box.append(summary, text);
    bubble.prepend(box);
  }
  box.querySelector(".thinking-text").textContent = thinking;   // the model's words, as text
}

function answerOf(bubble) {
  const { thinking, answer } = splitThinking(bubble.raw, bubble.classList.contains("streaming"));
  showThinking(bubble, thinking);
  return answer;
}

function paintTail(bubble) {
  bubble.frame = 0;
  let links = false;
  timed(bubble, (body) => {
    const tokens = markdown.lexer(answerOf(bubble));
    const blocks = bubble.blocks;
    let same = 0;
    while (same < blocks.length && same < tokens.length && blocks[same].raw === tokens[same].raw) {
      same += 1;
    }
    for (const block of blocks.splice(same)) block.nodes.forEach((node) => node.remove());
    for (const token of tokens.slice(same)) {
      const one = [token];
      one.links = tokens.links;            // reference links defined so far
      const fragment = clean(markdown.parser(one));
      blocks.push({ raw: token.raw, nodes: [...fragment.childNodes] });
      body.append(fragment);
    }
    links = Object.keys(tokens.links).length > 0;
  });
  return links;
}

function setReply(bubble, text) {
  bubble.raw = text;
  bubble.blocks = [];
  if (bubble.frame) cancelAnimationFrame(bubble.frame);
  bubble.frame = 0;
  timed(bubble, (body) => body.replaceChildren(renderMarkdown(answerOf(bubble))));
}

function appendToReply(bubble, piece) {
  if (!bubble.blocks.length && bubble.raw) {
    bubble.querySelector(".text").replaceChildren();   // rendered whole: start over by blocks
  }
  bubble.raw += piece;
  renderStats.chunks += 1;
  if (!bubble.frame) bubble.frame = requestAnimationFrame(() => paintTail(bubble));
}

function endReply(bubble, rest) {
  bubble.raw += rest;
  if (bubble.frame) cancelAnimationFrame(bubble.frame);
  if (!bubble.blocks.length || paintTail(bubble)) setReply(bubble, bubble.raw);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) { /* denied: try the old way */ }
  }
  const area = document.createElement("textarea");   // plain http on a LAN address
  area.className = "clipboard";
  area.value = text;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  return copied;
}

// -- Errors in words: what happened and what the user can do about it -----------------------
const EXPLANATIONS = {
  400: (m) => `The server did not accept this request: ${m}`,
  401: () => sessionStorage.getItem(KEY_ITEM)
    ? "The API key was not accepted. Enter it again below."
    : "This server needs an API key: enter it below. It is kept in this tab only.",
  409: () => "This chat is still answering a previous message (perhaps in another tab). " +
             "Wait for it to finish, or stop it, then try again.",
  413: () => "The message is too long for the server.",
  429: () => "The server is busy: every generation slot and queue place is taken. " +
             "Please try again in a moment.",
  503: () => "The model is not ready (still loading, or the server is shutting down). " +
             "Please try again shortly.",
};

function explain(status, message, code) {
  if (code === "too_many_sessions") return message;   // not the queue: the server's words
  const words = EXPLANATIONS[status];
  if (words) return words(message);
  return `The server answered ${status}${message ? ": " + message : ""}.`;
}

async function errorOf(response) {
  let message = "", code = "";
  try {
    const body = await response.json();
    message = body.message || (body.error && body.error.message) || "";
    code = typeof body.error === "string" ? body.error : "";
  } catch (_) { /* not JSON: the status says enough */ }
  const text = explain(response.status, message, code);
  if (response.status === 401) askForKey();
  return text;
}

// The key, if any, on every request that needs it; POSTs say they are JSON (else 415).
function authHeaders() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function postHeaders() {
  return { "Content-Type": "application/json", ...authHeaders() };
}

function askForKey() {
  ui.keyForm.hidden = false;
  ui.key.value = "";
  ui.key.focus();
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  ui.notice.textContent = "";
}

// -- The conversation on screen ------------------------------------------------------------
function addMessage(role, text) {
  ui.empty.hidden = true;
  const element = document.createElement("div");
  element.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  element.append(body);
  ui.messages.append(element);
  if (role === "assistant") {
    setReply(element, text);
  } else {
    body.textContent = text;   // the user's own words, shown as typed
  }
  scrollDown();
  return element;
}

function removeMessages() {
  ui.messages.querySelectorAll(".message").forEach((m) => m.remove());
  ui.empty.hidden = false;
}

function setTag(element, text) {
  let tag = element.querySelector(".tag");
  if (!tag) {
    tag = document.createElement("span");
    tag.className = "tag";
    element.append(tag);
  }
  tag.textContent = text;
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function lastReply() {
  const replies = ui.messages.querySelectorAll(".message.assistant:not(.failed)");
  return replies.length ? replies[replies.length - 1] : null;
}

function setBusy(busy) {
  ui.send.disabled = busy || modelLoading;
  ui.stop.disabled = !busy;
  ui.clear.disabled = busy;
  const last = ui.messages.lastElementChild;
  ui.regenerate.disabled = busy || modelLoading || !last ||
    !last.matches(".message.assistant:not(.failed)");
}

// Streams one reply into `bubble`. Returns "done", "stopped", "failed" or "refused".
async function streamReply(body, bubble) {
  controller = new AbortController();
  setBusy(true);
  hideNotice();
  try {
    const response = await fetch("/chat_stream", {
      method: "POST",
      headers: postHeaders(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      showNotice(await errorOf(response));
      return "refused";
    }
    bubble.classList.add("streaming");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();      // {stream: true} never splits a character
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      appendToReply(bubble, decoder.decode(value, { stream: true }));
    }
    endReply(bubble, decoder.decode());
    return "done";
  } catch (error) {
    endReply(bubble, "");                     // what arrived, rendered now
    if (error.name === "AbortError") return "stopped";
    showNotice("The reply was cut off: the connection to the server was lost or the model " +
               "failed. It was not saved; send the message again.");
    return "failed";
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
}

async function send(message) {
  const question = addMessage("user", message);
  const bubble = addMessage("assistant", "");
  const outcome = await streamReply({ user_input: message }, bubble);
  if (outcome === "refused") {
    // Nothing reached the server's history: take the message back for another try.
    question.remove();
    bubble.remove();
    ui.input.value = message;
  } else if (outcome === "stopped") {
    setTag(bubble, "stopped — the partial reply is kept");
  } else if (outcome === "failed") {
    question.classList.add("failed");
    bubble.classList.add("failed");
  }
  ui.empty.hidden = ui.messages.querySelector(".message") !== null;
  setBusy(false);
}

async function regenerate() {
  const bubble = lastReply();
  if (!bubble) return;
  const previous = bubble.raw;
  setReply(bubble, "");
  bubble.querySelector(".tag")?.remove();
  const outcome = await streamReply({ user_input: "", regenerate: true }, bubble);
  if (outcome === "refused") {
    setReply(bubble, previous);
  } else if (outcome === "stopped") {
    setTag(bubble, "stopped — the partial reply is kept");
  } else if (outcome === "failed") {
    bubble.classList.add("failed");
  }
  setBusy(false);
}

async function clearChat() {
  hideNotice();
  try {
    const response = await fetch("/clear_context", {
      method: "POST", headers: postHeaders(), body: "{}",
    });
    if (!response.ok) {
      showNotice(await errorOf(response));
      return;
    }
  } catch (_) {
    showNotice("The server could not be reached.");
    return;
  }
  removeMessages();
  setBusy(false);
}

// The session's conversation so far, e.g. after a reload. A reply still being written (in
// another tab) is not in it yet: the server stores a turn when its reply ends.
async function loadHistory() {
  try {
    const response = await fetch("/history", { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) {
      showNotice(await errorOf(response));
      return false;
    }
    const { messages } = await response.json();
    if (controller) return true;            // a reply started meanwhile: the screen is newer
    removeMessages();
    for (const { role, content } of messages) addMessage(role, content);
    return true;
  } catch (_) {
    showNotice("The server could not be reached.");
    return false;
  } finally {
    setBusy(Boolean(controller));
  }
}

// The model's state from /health: "Loading the model… NN %" until it is ready (polled every
// half second meanwhile), then its name.
async function watchHealth() {
  let again = 2000;
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const health = await response.json();
    modelLoading = health.engine === "loading";
    if (modelLoading) {
      const fraction = health.load_progress;
      const known = typeof fraction === "number";
      ui.loadingText.textContent = known
        ? `Loading the model… ${Math.floor(fraction * 100 + 1e-9)} %` : "Loading the model…";
      if (known) ui.loadingBar.value = fraction;
      else ui.loadingBar.removeAttribute("value");   // indeterminate
      again = 500;
    }
    ui.loading.hidden = !modelLoading;
    ui.model.textContent = health.model || (modelLoading ? "model loading…" : "model not ready");
    ui.model.classList.toggle("down", !response.ok);
    if (response.ok) again = 0;
  } catch (_) {
    ui.model.textContent = "server unreachable";
    ui.model.classList.add("down");
  }
  setBusy(Boolean(controller));
  if (again) setTimeout(watchHealth, again);
}

// -- Controls: mouse, touch and keyboard alike ----------------------------------------------
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const message = ui.input.value;
  if (!message.trim() || controller || modelLoading) return;
  ui.input.value = "";
  send(message);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();      // isComposing: Enter also confirms Japanese IME input
    ui.form.requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && controller && !event.isComposing) {
    event.preventDefault();
    controller.abort();
  }
});

ui.keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = ui.key.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  ui.keyForm.hidden = true;
  hideNotice();
  const pending = ui.input.value.trim();   // the message the 401 gave back, if any
  if (!pending && !ui.messages.querySelector(".message")) await loadHistory();
  if (pending) ui.form.requestSubmit();
  else ui.input.focus();
});

ui.messages.addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const copied = await copyText(button.closest(".code").querySelector("pre").textContent);
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
});

ui.stop.addEventListener("click", () => controller?.abort());
ui.regenerate.addEventListener("click", regenerate);
ui.clear.addEventListener("click", clearChat);

window.chatstreamLite = { renderMarkdown, renderStats, splitThinking };

setBusy(false);
watchHealth();
loadHistory();
ui.input.focus();
