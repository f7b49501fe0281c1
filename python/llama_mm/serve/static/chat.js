// The chat page: keeps the conversation in OpenAI's message format, attaches images as data: URLs, and streams
// each answer from /v1/chat/completions (stream: true) by reading the server-sent events off fetch's body.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // OpenAI chat messages sent so far (user and assistant turns)
let pending = [];            // data: URLs of the images attached to the next message
let modelId = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text || "";
}

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return span;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelId = body.data[0].id;
    $("model").textContent = modelId;
  } catch (e) {
    $("model").textContent = "(model unknown: " + e.message + ")";
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    const url = await readFile(file);
    pending.push(url);
    const img = document.createElement("img");
    img.src = url;
    $("attachments").appendChild(img);
  }
}

// Parses server-sent events from a byte stream; calls onData(payload string) for each `data:` line.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:")) onData(line.slice(5).trim());
      }
    }
  }
}

async function send(text) {
  if (!modelId) await loadModel();
  const images = pending;
  pending = [];
  $("attachments").replaceChildren();
  const content = images.map((url) => ({ type: "image_url", image_url: { url } }));
  content.push({ type: "text", text });
  const userMessage = { role: "user", content };
  bubble("user", text, images);
  const out = bubble("assistant", "");
  $("send").disabled = true;
  setStatus("streaming", "…");
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: modelId,
        messages: history.concat([userMessage]),
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.status + " " + r.statusText);
    }
    let finish = null;
    await readEvents(r.body, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
          out.parentElement.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    history.push(userMessage, { role: "assistant", content: answer });
    setStatus("done", finish ? "finish reason: " + finish : "");
  } catch (e) {
    out.parentElement.remove();
    bubble("error", e.message);
    setStatus("error", e.message);
  } finally {
    $("send").disabled = false;
  }
}

$("file").addEventListener("change", (e) => attach(e.target.files).then(() => { e.target.value = ""; }));
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() && pending.length === 0) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("messages").replaceChildren();
  setStatus("idle", "");
});
$("api-key").value = localStorage.getItem("llama_mm_api_key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("llama_mm_api_key", $("api-key").value.trim());
  loadModel();
});
loadModel();
