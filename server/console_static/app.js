// Airlock's console. Everything lives in the variables below, in memory: no localStorage, sessionStorage,
// IndexedDB or cookies of its own (the session cookie is the server's, HttpOnly). Reload or Clear, and it is gone.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const DEFAULT_SCHEMA = {
    type: "object",
    properties: {
      elements: {
        type: "array",
        items: {
          type: "object",
          properties: {
            label: { type: "string" },
            bbox_2d: { type: "array", items: { type: "integer", minimum: 0, maximum: 1000 }, minItems: 4, maxItems: 4 },
          },
          required: ["label", "bbox_2d"],
        },
      },
    },
    required: ["elements"],
  };
  const state = { csrf: "", limits: {}, images: [], history: [], request: null };

  function showError(text) {
    const box = $("error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}), "x-airlock-console": "1" };
    if (options.body !== undefined) headers["content-type"] = "application/json";
    if (state.csrf) headers["x-airlock-csrf"] = state.csrf;
    return fetch(path, { ...options, headers, credentials: "same-origin", cache: "no-store" });
  }

  // What went wrong, in plain words (the server's messages already are; a few get a kinder wording).
  async function problem(response) {
    let message = `the server answered ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON */ }
    if (response.status === 401) return "Wrong user name or password, or your session has ended: sign in again.";
    const wait = response.headers.get("retry-after");
    if (wait && (response.status === 429 || response.status === 503)) message += ` (try again in ${wait} s)`;
    return message.charAt(0).toUpperCase() + message.slice(1);
  }

  // --- signing in and out -------------------------------------------------------------------------------------

  function showSignIn(methods) {
    $("workspace").hidden = true;
    $("who").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    $("password-form").hidden = !methods.password;
    $("oidc-sign-in").hidden = !methods.oidc;
    if (methods.password) $("username").focus();
  }

  async function enter(session) {
    state.csrf = session.csrf || "";
    $("sign-in").hidden = true;
    $("workspace").hidden = false;
    $("who").textContent = `Signed in as ${session.name}`;
    $("who").hidden = false;
    $("sign-out").hidden = !state.csrf;
    await loadModels();
    $("question").focus();
  }

  async function loadModels() {
    const response = await api("/v1/models");
    if (!response.ok) {
      showError(await problem(response));
      return;
    }
    const models = (await response.json()).data || [];
    const select = $("model");
    select.replaceChildren(...models.map((model) => new Option(model.id, model.id)));
    if (!models.length) showError("No model is ready yet. Try again in a minute.");
  }

  async function signInWithPassword(event) {
    event.preventDefault();
    showError("");
    const body = JSON.stringify({ username: $("username").value, password: $("password").value });
    const response = await api("/console/api/sign-in", { method: "POST", body });
    $("password").value = "";
    if (!response.ok) {
      showError(response.status === 401 ? "Wrong user name or password." : await problem(response));
      return;
    }
    await enter(await response.json());
  }

  async function signOut() {
    clearConversation();
    await api("/console/api/sign-out", { method: "POST", body: "{}" });
    state.csrf = "";
    await start();
  }

  // --- images -------------------------------------------------------------------------------------------------

  const ACCEPTED = ["image/png", "image/jpeg", "image/webp"];

  function readAsDataURL(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  // Scale an image down in the browser when it has more pixels than the server takes (and than a model needs).
  async function prepare(file) {
    const bitmap = await createImageBitmap(file);
    const { width, height } = bitmap;
    const limit = state.limits.max_image_pixels || 4000000;
    const scale = Math.min(1, Math.sqrt(limit / (width * height)));
    let blob = file;
    if (scale < 1) {
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.floor(width * scale));
      canvas.height = Math.max(1, Math.floor(height * scale));
      canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    }
    bitmap.close();
    const sent = scale < 1 ? { width: Math.floor(width * scale), height: Math.floor(height * scale) } : { width, height };
    return { name: file.name || "pasted image", url: await readAsDataURL(blob), thumb: URL.createObjectURL(blob),
             original: { width, height }, sent };
  }

  async function addFiles(files) {
    showError("");
    for (const file of files) {
      if (!ACCEPTED.includes(file.type)) {
        showError(`${file.name || "That file"} is not a PNG, JPEG or WebP image.`);
        continue;
      }
      const most = state.limits.max_images ?? 8;
      if (state.images.length >= most) {
        showError(`At most ${most} images per question.`);
        break;
      }
      try {
        state.images.push(await prepare(file));
      } catch (_) {
        showError(`${file.name || "That image"} could not be read.`);
      }
    }
    renderThumbnails();
  }

  function renderThumbnails() {
    const list = $("thumbnails");
    list.replaceChildren(...state.images.map((image, index) => {
      const item = document.createElement("li");
      const picture = new Image();
      picture.src = image.thumb;
      picture.alt = `Image ${index + 1}: ${image.name}`;
      const caption = document.createElement("span");
      const scaled = image.sent.width !== image.original.width;
      caption.textContent = `${image.sent.width}×${image.sent.height}${scaled ? " (scaled down)" : ""}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "secondary";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove image ${index + 1}`);
      remove.addEventListener("click", () => {
        URL.revokeObjectURL(image.thumb);
        state.images.splice(index, 1);
        renderThumbnails();
      });
      item.append(picture, caption, remove);
      return item;
    }));
  }

  // --- asking -------------------------------------------------------------------------------------------------

  function mode() {
    return document.querySelector('input[name="mode"]:checked').value;
  }

  function turn(role) {
    const article = document.createElement("article");
    const heading = document.createElement("p");
    heading.className = "role";
    heading.textContent = role;
    article.append(heading);
    $("conversation").append(article);
    return article;
  }

  async function ask(event) {
    event.preventDefault();
    if (state.request) return;
    showError("");
    const question = $("question").value.trim();
    if (!question) {
      showError("Type a question first.");
      return;
    }
    const body = { model: $("model").value, stream: true, messages: [] };
    // "As long as the model allows" sends no max_tokens: the engine then stops at what is left of the context, and at
    // the server's limit (its default answer length). A chosen length is capped to that limit.
    if ($("length").value) body.max_tokens = Math.min(Number($("length").value), state.limits.max_tokens || Infinity);
    if (mode() === "json") {
      try {
        body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse($("schema").value) } };
      } catch (error) {
        showError(`The JSON schema is not valid JSON: ${error.message}`);
        return;
      }
    }
    const images = state.images.splice(0);
    const content = [{ type: "text", text: question }, ...images.map((image) => ({ type: "image_url", image_url: { url: image.url } }))];
    body.messages = withinImageLimit([...state.history, { role: "user", content }]);

    const mine = turn("You");
    const said = document.createElement("p");
    said.className = "answer";
    said.textContent = question;
    const pictures = document.createElement("div");
    pictures.className = "user-images";
    for (const image of images) {
      const picture = new Image();
      picture.src = image.thumb;
      picture.alt = image.name;
      pictures.append(picture);
    }
    mine.append(said, pictures);
    $("question").value = "";
    renderThumbnails();

    const theirs = turn("Airlock");
    theirs.setAttribute("aria-busy", "true");
    const reasoning = document.createElement("details");
    reasoning.className = "reasoning";
    reasoning.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const thoughts = document.createElement("pre");
    reasoning.append(summary, thoughts);
    const answer = document.createElement("div");
    answer.className = "answer";
    theirs.append(reasoning, answer);

    state.request = new AbortController();
    $("send").disabled = true;
    $("stop").hidden = false;
    let text = "";
    try {
      const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: state.request.signal });
      if (!response.ok) {
        const message = await problem(response);
        answer.textContent = "(no answer)";
        showError(message);
        if (response.status === 401) await start();
        return;
      }
      text = await readStream(response, (piece) => { answer.textContent += piece; }, (piece) => {
        reasoning.hidden = false;
        thoughts.textContent += piece;
      });
      if (mode() === "json") showJson(answer, text, images);
      state.history.push({ role: "user", content }, { role: "assistant", content: text });
    } catch (error) {
      if (error.name !== "AbortError") showError("The server cannot be reached. Check your connection and try again.");
    } finally {
      theirs.setAttribute("aria-busy", "false");
      state.request = null;
      $("send").disabled = false;
      $("stop").hidden = true;
    }
  }

  // Follow-up questions carry the earlier turns, images included, but never more images than the server takes:
  // the oldest turns lose theirs first.
  function withinImageLimit(messages) {
    const most = state.limits.max_images ?? 8;
    const isImage = (part) => part.type === "image_url";
    let count = messages.reduce((sum, m) => sum + (Array.isArray(m.content) ? m.content.filter(isImage).length : 0), 0);
    return messages.map((message) => {
      if (count <= most || !Array.isArray(message.content) || message === messages[messages.length - 1]) return message;
      const images = message.content.filter(isImage).length;
      count -= images;
      return { ...message, content: message.content.filter((part) => !isImage(part)) };
    });
  }

  // Server-sent events: the answer's pieces as they come; an error event mid-way is shown as such.
  async function readStream(response, onText, onReasoning) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    let text = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      const events = buffered.split("\n\n");
      buffered = events.pop();
      for (const event of events) {
        const data = event.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          showError(chunk.error.message || "The answer was cut short.");
          continue;
        }
        const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
        const thinking = delta.reasoning || delta.reasoning_content;
        if (thinking) onReasoning(thinking);
        if (delta.content) {
          text += delta.content;
          onText(delta.content);
        }
      }
    }
    return text;
  }

  // A JSON answer, shown formatted; boxes it names (bbox_2d: [x1, y1, x2, y2], 0 to 1000) drawn over the image.
  function showJson(answer, text, images) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (_) {
      showError("The answer is not complete JSON (it may have reached its length limit).");
      return;
    }
    const formatted = document.createElement("pre");
    formatted.className = "json";
    formatted.textContent = JSON.stringify(value, null, 2);
    answer.replaceChildren(formatted);
    const boxes = [];
    (function collect(node) {
      if (Array.isArray(node)) node.forEach(collect);
      else if (node && typeof node === "object") {
        const box = node.bbox_2d || node.bbox;
        if (Array.isArray(box) && box.length === 4 && box.every((n) => typeof n === "number")) {
          boxes.push({ box, label: String(node.label ?? node.name ?? "") });
        }
        Object.values(node).forEach(collect);
      }
    })(value);
    if (!boxes.length || !images.length) return;
    const image = images[0];
    const figure = document.createElement("figure");
    figure.className = "overlay";
    const picture = new Image();
    picture.src = image.thumb;
    picture.alt = `${image.name}, with ${boxes.length} box(es) drawn over it`;
    const SVG = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 1000 1000");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("aria-hidden", "true");
    for (const { box, label } of boxes) {
      const [x1, y1, x2, y2] = box;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", Math.min(x1, x2));
      rect.setAttribute("y", Math.min(y1, y2));
      rect.setAttribute("width", Math.abs(x2 - x1));
      rect.setAttribute("height", Math.abs(y2 - y1));
      const name = document.createElementNS(SVG, "text");
      name.setAttribute("x", Math.min(x1, x2));
      name.setAttribute("y", Math.max(24, Math.min(y1, y2) - 6));
      name.textContent = label;
      svg.append(rect, name);
    }
    figure.append(picture, svg);
    answer.append(figure);
  }

  function clearConversation() {
    if (state.request) state.request.abort();
    for (const image of state.images) URL.revokeObjectURL(image.thumb);
    for (const picture of document.querySelectorAll("#conversation img")) {
      if (picture.src.startsWith("blob:")) URL.revokeObjectURL(picture.src);
    }
    state.images = [];
    state.history = [];
    $("conversation").replaceChildren();
    $("question").value = "";
    renderThumbnails();
    showError("");
  }

  // --- wiring -------------------------------------------------------------------------------------------------

  async function start() {
    const params = new URLSearchParams(location.search);
    if (params.get("signin") === "failed") showError("Sign-in failed. Try again.");
    if (location.search) history.replaceState(null, "", "/");
    const response = await api("/console/api/session");
    const session = await response.json();
    state.limits = session.limits || {};
    if (session.signed_in) await enter(session);
    else showSignIn(session.methods || {});
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("schema").value = JSON.stringify(DEFAULT_SCHEMA, null, 2);
    $("password-form").addEventListener("submit", signInWithPassword);
    $("sign-out").addEventListener("click", signOut);
    $("ask-form").addEventListener("submit", ask);
    $("stop").addEventListener("click", () => state.request && state.request.abort());
    $("clear").addEventListener("click", clearConversation);
    $("files").addEventListener("change", (event) => { addFiles([...event.target.files]); event.target.value = ""; });
    const drop = $("drop");
    drop.addEventListener("click", () => $("files").click());
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        $("files").click();
      }
    });
    drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      addFiles([...event.dataTransfer.files]);
    });
    document.addEventListener("paste", (event) => {
      const files = [...(event.clipboardData ? event.clipboardData.files : [])];
      if (files.length) {
        event.preventDefault();
        addFiles(files);
      }
    });
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask-form").requestSubmit();
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => { $("schema-box").hidden = mode() !== "json"; });
    }
    start().catch(() => showError("The server cannot be reached. Check your connection and reload the page."));
  });
})();
