// chatstream_lite chat UI: plain JavaScript, no build step, no network access beyond this server.
//
// Send POSTs to /chat_stream and reads the text/plain body as it streams; Stop aborts that
// fetch (the server sees the client leave, stops generating and keeps the partial reply);
// Regenerate asks for a new last reply; Clear forgets the conversation on the server.
// With an API key on the server, a 401 shows a key field; the key is kept in this tab only
// (sessionStorage) and sent as "Authorization: Bearer <key>", the way other clients send it.
// No inline script or style anywhere: the server's Content-Security-Policy forbids them.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), empty: $("empty"), notice: $("notice"), model: $("model"),
  form: $("composer"), input: $("input"),
  send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
  keyForm: $("key-form"), key: $("key"),
};
const KEY_ITEM = "chatstream_lite.api_key";

let controller = null;          // the AbortController of the reply being streamed, if any

// Errors in words: what happened and what the user can do about it.
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

// Headers for every POST: JSON (the server refuses other types, 415) and the key, if any.
function postHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
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

function addMessage(role, text) {
  ui.empty.hidden = true;
  const element = document.createElement("div");
  element.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;     // never innerHTML: replies are untrusted text
  element.append(body);
  ui.messages.append(element);
  scrollDown();
  return element;
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

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function lastReply() {
  const replies = ui.messages.querySelectorAll(".message.assistant:not(.failed)");
  return replies.length ? replies[replies.length - 1] : null;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.clear.disabled = busy;
  const last = ui.messages.lastElementChild;
  ui.regenerate.disabled = busy || !last || !last.matches(".message.assistant:not(.failed)");
}

// Streams one reply into `bubble`. Returns "done", "stopped", "failed" or "refused".
async function streamReply(body, bubble) {
  controller = new AbortController();
  const text = bubble.querySelector(".text");
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
      text.textContent += decoder.decode(value, { stream: true });
      scrollDown();
    }
    text.textContent += decoder.decode();
    return "done";
  } catch (error) {
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
  const previous = bubble.querySelector(".text").textContent;
  bubble.querySelector(".text").textContent = "";
  bubble.querySelector(".tag")?.remove();
  const outcome = await streamReply({ user_input: "", regenerate: true }, bubble);
  if (outcome === "refused") {
    bubble.querySelector(".text").textContent = previous;
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
  ui.messages.querySelectorAll(".message").forEach((m) => m.remove());
  ui.empty.hidden = false;
  setBusy(false);
}

async function showModel() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    ui.model.textContent = health.model ? `${health.model}` : "model loading…";
    ui.model.classList.toggle("down", !response.ok);
    if (!response.ok) setTimeout(showModel, 2000);
  } catch (_) {
    ui.model.textContent = "server unreachable";
    ui.model.classList.add("down");
    setTimeout(showModel, 2000);
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const message = ui.input.value;
  if (!message.trim() || controller) return;
  ui.input.value = "";
  send(message);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();      // isComposing: Enter also confirms Japanese IME input
    ui.form.requestSubmit();
  }
});

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.key.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  ui.keyForm.hidden = true;
  hideNotice();
  if (ui.input.value.trim()) ui.form.requestSubmit();   // the message the 401 gave back
  else ui.input.focus();
});

ui.stop.addEventListener("click", () => controller?.abort());
ui.regenerate.addEventListener("click", regenerate);
ui.clear.addEventListener("click", clearChat);

setBusy(false);
showModel();
ui.input.focus();
