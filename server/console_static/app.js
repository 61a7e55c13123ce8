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
  const NOT_READY = "No model is ready yet. Try again in a minute.";
  const NONE_ALLOWED = "Your account may not use any of the models this server serves. Ask whoever runs Airlock " +
    "here (the people who gave you your sign-in) to allow your account, or a group you belong to, a model.";
  // attachments: what goes with the next question (images and documents), in the order chosen.
  const state = { csrf: "", limits: {}, attachments: [], history: [], request: null, shown: [] };

  // --- markdown ----------------------------------------------------------------------------------------------
  // Answers are markdown (GitHub's flavour: tables, lists, code): marked renders it, DOMPurify keeps only the
  // elements below. Links keep only http(s) and mailto targets and open in a new tab without referrer or opener
  // (this page keeps the conversation only while it is open). No image ever loads from an answer, not even from this
  // server (the request would carry the session cookie): <img> is not among the elements kept.
  const markdown = new marked.Marked({ gfm: true, breaks: true });
  const KEPT = {
    ALLOWED_TAGS: ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "li", "pre", "code",
      "em", "strong", "del", "s", "sub", "sup", "kbd", "a", "table", "thead", "tbody", "tr", "th", "td"],
    ALLOWED_ATTR: ["href", "title", "align", "start"],
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,
  };
  const LINK_TARGETS = /^(?:https?:|mailto:)/i;
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName !== "A") return;
    if (!LINK_TARGETS.test((node.getAttribute("href") || "").trim())) {
      node.removeAttribute("href");
      return;
    }
    node.setAttribute("rel", "noopener noreferrer");
    node.setAttribute("target", "_blank");
  });

  function renderMarkdown(target, text) {
    target.replaceChildren(DOMPurify.sanitize(markdown.parse(text), KEPT));
  }

  // A text that grows while it streams, shown at a bounded rate: each render parses the whole text again, so the
  // longer it is, the longer the pause between renders (about 25 a second for a short answer, one a second at most
  // for a very long one), never once per token.
  function liveText(target, asMarkdown) {
    let text = "";
    let timer = null;
    const show = () => {
      timer = null;
      if (asMarkdown) renderMarkdown(target, text);
      else target.textContent = text;
      followStream();
    };
    return {
      get text() { return text; },
      add(piece) {
        text += piece;
        if (timer === null) timer = setTimeout(show, Math.min(1000, 40 + text.length / 25));
      },
      flush() {
        if (timer !== null) clearTimeout(timer);
        show();
      },
    };
  }

  // --- following the answer ----------------------------------------------------------------------------------
  // The view stays at the bottom while an answer streams, until the user scrolls up; scrolling back to the bottom
  // resumes. Content growing below never moves the view up (and the conversation takes no part in the browser's
  // scroll anchoring: app.css), so a scroll upwards is the user's.
  const follow = { on: true, top: 0 };
  const scroller = () => document.scrollingElement || document.documentElement;
  const atBottom = () => {
    const page = scroller();
    return page.scrollHeight - page.scrollTop - page.clientHeight < 40;
  };

  function followStream() {
    if (!follow.on) return;
    const page = scroller();
    page.scrollTop = page.scrollHeight;
  }

  // Late growth (an image decoded, the question box grown by an attachment put back) keeps a following view at the
  // bottom too.
  new ResizeObserver(() => followStream()).observe(document.body);

  window.addEventListener("scroll", () => {
    const top = scroller().scrollTop;
    if (atBottom()) follow.on = true;
    else if (top < follow.top) follow.on = false;
    follow.top = top;
  }, { passive: true });

  // --- talking to the gateway --------------------------------------------------------------------------------

  // Page-level problems only (signing in, the session, the list of models); a question's own errors are shown
  // with it, and the composer's next to it.
  function showError(text) {
    const box = $("error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function note(text) {
    const box = $("composer-note");
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
    return sentence(message);
  }

  const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1);
  const ended = (text) => (/[.!?)]$/.test(text) ? text : `${text}.`);

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
    $("demo-banner").hidden = !session.demo;
    const documents = (state.limits.documents || {}).enabled;
    $("kinds").textContent = documents ? "images, PDFs or TIFF scans" : "images";
    $("files").accept = ["image/png", "image/jpeg", "image/webp",
      ...(documents ? ["application/pdf", "image/tiff", ".pdf", ".tif", ".tiff"] : [])].join(",");
    await loadModels();
    $("question").focus();
  }

  let modelsRetry = null;

  async function loadModels() {
    clearTimeout(modelsRetry);
    const response = await api("/v1/models");
    if (!response.ok) {
      showError(await problem(response));
      return;
    }
    const models = (await response.json()).data || [];
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(...models.map((model) => new Option(model.id, model.id)));
    if (models.some((model) => model.id === chosen)) select.value = chosen;
    if (models.length) {
      if ([NOT_READY, NONE_ALLOWED].includes($("error").textContent)) showError("");
      return;
    }
    // An empty list: the gateway says whether it serves models at all (not which), so that a user whom the rules
    // allow none learns so, instead of waiting for models that will never come.
    const session = await (await api("/console/api/session")).json();
    showError(session.serving ? NONE_ALLOWED : NOT_READY);
    if (!session.serving && session.signed_in) modelsRetry = setTimeout(() => loadModels().catch(() => {}), 10000);
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
    await start();
  }

  async function signOut() {
    clearConversation();
    clearTimeout(modelsRetry);
    await api("/console/api/sign-out", { method: "POST", body: "{}" });
    state.csrf = "";
    await start();
  }

  // --- attachments: images ------------------------------------------------------------------------------------

  const IMAGES = ["image/png", "image/jpeg", "image/webp"];

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
    return { kind: "image", name: file.name || "pasted image", url: await readAsDataURL(blob), blob,
             original: { width, height }, sent };
  }

  // --- attachments: documents ---------------------------------------------------------------------------------
  // A PDF or TIFF goes to the server's preview (rendered in its memory, nothing kept) for page thumbnails and its
  // page count; the question then carries the whole document as an OpenAI file part with the pages chosen.

  function documentType(file) {
    const name = (file.name || "").toLowerCase();
    if (file.type === "application/pdf" || name.endsWith(".pdf")) return "application/pdf";
    if (file.type === "image/tiff" || name.endsWith(".tif") || name.endsWith(".tiff")) return "image/tiff";
    return null;
  }

  const megabytes = (bytes) => `${Math.round(bytes / 1048576)} MB`;

  async function addDocument(file, type) {
    const name = file.name || "document";
    const limits = state.limits.documents || {};
    if (!limits.enabled) {
      note(`${name} is a document: this server takes images only (PNG, JPEG or WebP).`);
      return;
    }
    if (limits.max_bytes && file.size > limits.max_bytes) {
      note(`${name} is larger than this server takes (${megabytes(limits.max_bytes)}).`);
      return;
    }
    const data = await readAsDataURL(new Blob([file], { type }));
    const response = await api("/v1/airlock/documents/preview", { method: "POST", body: JSON.stringify({ file_data: data }) });
    if (!response.ok) {
      note(`${name}: ${await problem(response)}`);
      if (response.status === 401) await start();
      return;
    }
    const preview = await response.json();
    // The first pages, as many as fit beside what is already attached (the user may choose others).
    const room = Math.max(1, Math.min(imageRoom(), (limits.max_pages || Infinity) - chosenPages()));
    const last = Math.min(preview.page_count, room);
    state.attachments.push({ kind: "document", name, data, pageCount: preview.page_count, previews: preview.pages,
                             range: last > 1 ? `1-${last}` : "1", pages: pagesOf(last) });
    if (preview.page_count > last) {
      note(`${name} has ${preview.page_count} pages; ${last} can go with this question (each page counts as an ` +
           `image): ${last === 1 ? "page 1 is" : `pages 1-${last} are`} chosen, choose others beside its thumbnails.`);
    }
  }

  const pagesOf = (count) => Array.from({ length: count }, (_, index) => index + 1);

  // "1-3, 7" -> [1, 2, 3, 7] (the server's pages syntax: ranges and single pages, 1-based, in the order given).
  function parsePages(text, total) {
    const pages = [];
    for (const piece of text.split(",").map((part) => part.trim()).filter(Boolean)) {
      const match = /^(\d+)\s*(?:-\s*(\d+))?$/.exec(piece);
      if (!match) throw new Error(`"${piece}" is not a page or a range such as 2-5`);
      const first = Number(match[1]);
      const end = match[2] === undefined ? first : Number(match[2]);
      if (first < 1 || end < first) throw new Error(`"${piece}" is not a range of pages`);
      if (end > total) throw new Error(`the document has ${total} page${total === 1 ? "" : "s"}`);
      for (let page = first; page <= end; page += 1) if (!pages.includes(page)) pages.push(page);
    }
    if (!pages.length) throw new Error("choose at least one page");
    return pages;
  }

  // Ranges again from a list of pages, as the request sends them: [1, 2, 3, 7] -> "1-3,7".
  function rangesOf(pages) {
    const parts = [];
    for (let index = 0; index < pages.length; index += 1) {
      let end = index;
      while (end + 1 < pages.length && pages[end + 1] === pages[end] + 1) end += 1;
      parts.push(end > index ? `${pages[index]}-${pages[end]}` : `${pages[index]}`);
      index = end;
    }
    return parts.join(",");
  }

  // What one attachment costs against the image limit: an image one, a document its chosen pages.
  const weight = (attachment) => (attachment.kind === "document" ? attachment.pages.length : 1);
  const maxImages = () => state.limits.max_images ?? 8;
  const imageRoom = () => maxImages() - state.attachments.reduce((sum, attachment) => sum + weight(attachment), 0);
  const chosenPages = () => state.attachments.reduce((sum, a) => sum + (a.kind === "document" ? a.pages.length : 0), 0);

  async function addFiles(files) {
    note("");
    for (const file of files) {
      const type = documentType(file);
      if (!type && !IMAGES.includes(file.type)) {
        const documents = (state.limits.documents || {}).enabled;
        note(`${file.name || "That file"} is not a PNG, JPEG or WebP image${documents ? ", a PDF or a TIFF scan" : ""}.`);
        continue;
      }
      if (imageRoom() < 1) {
        note(`At most ${maxImages()} images per question (a document's pages count as images).`);
        break;
      }
      try {
        if (type) await addDocument(file, type);
        else state.attachments.push(await prepare(file));
      } catch (_) {
        note(`${file.name || "That file"} could not be read.`);
      }
      renderThumbnails();
    }
    renderThumbnails();
  }

  // The composer's thumbnails. Object URLs of the images shown are made for each drawing and revoked at the next.
  function renderThumbnails() {
    for (const url of state.shown) URL.revokeObjectURL(url);
    state.shown = [];
    const list = $("thumbnails");
    list.replaceChildren(...state.attachments.map((attachment, index) => {
      const item = document.createElement("li");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "secondary";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove ${attachment.kind} ${index + 1}`);
      remove.addEventListener("click", () => {
        state.attachments.splice(index, 1);
        renderThumbnails();
      });
      if (attachment.kind === "document") {
        item.className = "document";
        item.append(...documentControls(attachment, index), remove);
        return item;
      }
      const picture = new Image();
      picture.src = URL.createObjectURL(attachment.blob);
      state.shown.push(picture.src);
      picture.alt = `Image ${index + 1}: ${attachment.name}`;
      const caption = document.createElement("span");
      const scaled = attachment.sent.width !== attachment.original.width;
      caption.textContent = `${attachment.sent.width}×${attachment.sent.height}${scaled ? " (scaled down)" : ""}`;
      item.append(picture, caption, remove);
      return item;
    }));
  }

  function documentControls(attachment, index) {
    const strip = document.createElement("div");
    strip.className = "pages";
    const pictures = attachment.previews.map((page) => {
      const picture = new Image();
      picture.src = page.thumbnail;
      picture.alt = `Page ${page.number}`;
      picture.dataset.page = page.number;
      return picture;
    });
    strip.append(...pictures);
    const caption = document.createElement("span");
    caption.className = "caption";
    const label = document.createElement("label");
    label.textContent = "Pages";
    const range = document.createElement("input");
    range.value = attachment.range;
    range.className = "range";
    range.setAttribute("aria-label", `Pages of ${attachment.name} to send`);
    label.append(range);
    const update = () => {
      attachment.range = range.value;
      try {
        attachment.pages = parsePages(range.value, attachment.pageCount);
        attachment.invalid = "";
      } catch (error) {
        attachment.invalid = `${attachment.name}: ${error.message}.`;
      }
      range.setAttribute("aria-invalid", attachment.invalid ? "true" : "false");
      const count = attachment.pages.length;
      caption.textContent = attachment.invalid ||
        `${attachment.name}: ${count} of ${attachment.pageCount} page${attachment.pageCount === 1 ? "" : "s"} will be sent`;
      caption.classList.toggle("note", Boolean(attachment.invalid));
      for (const picture of pictures) picture.classList.toggle("skipped", !attachment.pages.includes(Number(picture.dataset.page)));
    };
    range.addEventListener("input", () => {
      note("");
      update();
    });
    range.addEventListener("keydown", (event) => { if (event.key === "Enter") event.preventDefault(); });
    update();
    strip.setAttribute("aria-label", `Document ${index + 1}: ${attachment.name}`);
    return [strip, caption, document.createElement("br"), label];
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

  function contentPart(attachment) {
    if (attachment.kind === "image") return { type: "image_url", image_url: { url: attachment.url } };
    return { type: "file", file: { file_data: attachment.data, filename: attachment.name, pages: rangesOf(attachment.pages) } };
  }

  // The question as it appears in the conversation, with what went with it.
  function showQuestion(question, attachments) {
    const mine = turn("You");
    const said = document.createElement("p");
    said.className = "said";
    said.textContent = question;
    const pictures = document.createElement("div");
    pictures.className = "user-images";
    for (const attachment of attachments.filter((a) => a.kind === "image")) {
      const picture = new Image();
      picture.src = URL.createObjectURL(attachment.blob); // revoked on Clear
      picture.alt = attachment.name;
      pictures.append(picture);
    }
    mine.append(said, pictures);
    for (const attachment of attachments.filter((a) => a.kind === "document")) {
      const pages = document.createElement("div");
      pages.className = "user-pages";
      const caption = document.createElement("p");
      caption.textContent = `${attachment.name}, page${attachment.pages.length === 1 ? "" : "s"} ` +
        `${rangesOf(attachment.pages)} of ${attachment.pageCount}`;
      pages.append(caption, ...attachment.previews.filter((page) => attachment.pages.includes(page.number)).map((page) => {
        const picture = new Image();
        picture.src = page.thumbnail;
        picture.alt = `${attachment.name}, page ${page.number}`;
        return picture;
      }));
      mine.append(pages);
    }
  }

  // The answer's place in the conversation: reasoning (folded), the answer, then its tools or its error.
  function showReply(asJson) {
    const article = turn("Airlock");
    article.setAttribute("aria-busy", "true");
    const reasoning = document.createElement("details");
    reasoning.className = "reasoning";
    reasoning.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const thoughts = document.createElement("pre");
    reasoning.append(summary, thoughts);
    const answer = document.createElement("div");
    answer.className = asJson ? "answer plain" : "answer";
    article.append(reasoning, answer);
    return { article, answer, text: liveText(answer, !asJson), thoughts: liveText(thoughts, false), reasoning };
  }

  // A copy button for the answer's markdown source (or JSON), with a visible "Copied".
  function addCopy(article, text) {
    const tools = document.createElement("div");
    tools.className = "tools";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "secondary copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-live", "polite");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(text);
        copy.textContent = "Copied";
        copy.classList.add("done");
      } catch (_) {
        copy.textContent = "Copy failed: select the text instead";
      }
      setTimeout(() => {
        copy.textContent = "Copy";
        copy.classList.remove("done");
      }, 2000);
    });
    tools.append(copy);
    article.append(tools);
  }

  function turnNote(article, text) {
    const box = document.createElement("p");
    box.className = "turn-error";
    box.setAttribute("role", "alert");
    box.textContent = text;
    article.append(box);
    followStream();
  }

  // A question that got no (complete) answer: the error beside it, and the question with its attachments back in
  // the composer for another try (the question only when the box is still empty: never over a new one).
  function failed(reply, message, question, attachments) {
    if (!reply.text.text) reply.answer.hidden = true;
    const box = $("question");
    const back = !box.value.trim();
    if (back) box.value = question;
    state.attachments.push(...attachments);
    renderThumbnails();
    const kept = attachments.length ? " and what went with it are" : " is";
    turnNote(reply.article, back ? `${ended(message)} Your question${kept} back in the question box: ask again when ready.`
      : message);
  }

  async function ask(event) {
    event.preventDefault();
    if (state.request) return;
    note("");
    const question = $("question").value.trim();
    if (!question) {
      note("Type a question first.");
      return;
    }
    const asJson = mode() === "json";
    const body = { model: $("model").value, stream: true, messages: [] };
    // "As long as the model allows" sends no max_tokens: the engine then stops at what is left of the context, and at
    // the server's limit (its default answer length). A chosen length is capped to that limit.
    if ($("length").value) body.max_tokens = Math.min(Number($("length").value), state.limits.max_tokens || Infinity);
    if (asJson) {
      try {
        body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse($("schema").value) } };
      } catch (error) {
        note(`The JSON schema is not valid JSON: ${error.message}`);
        return;
      }
    }
    const invalid = state.attachments.find((attachment) => attachment.invalid);
    if (invalid) {
      note(invalid.invalid);
      return;
    }
    if (imageRoom() < 0) {
      note(`At most ${maxImages()} images per question (a document's pages count as images): remove some, or choose fewer pages.`);
      return;
    }
    const mostPages = (state.limits.documents || {}).max_pages;
    if (mostPages && chosenPages() > mostPages) {
      note(`At most ${mostPages} document pages per question: choose fewer pages.`);
      return;
    }
    const attachments = state.attachments.splice(0);
    const content = [{ type: "text", text: question }, ...attachments.map(contentPart)];
    body.messages = withinImageLimit([...state.history, { role: "user", content }]);

    showQuestion(question, attachments);
    $("question").value = "";
    renderThumbnails();
    const reply = showReply(asJson);
    follow.on = true;
    followStream();

    state.request = new AbortController();
    $("send").disabled = true;
    $("stop").hidden = false;
    try {
      const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: state.request.signal });
      if (!response.ok) {
        const message = await problem(response);
        failed(reply, message, question, attachments);
        if (response.status === 401) {
          showError(message);
          await start();
        }
        return;
      }
      const error = await readStream(response, (piece) => reply.text.add(piece), (piece) => {
        reply.reasoning.hidden = false;
        reply.thoughts.add(piece);
      });
      reply.thoughts.flush();
      reply.text.flush();
      const text = reply.text.text;
      if (error) {
        failed(reply, sentence(error), question, attachments);
        return;
      }
      if (asJson) showJson(reply, text, attachments);
      addCopy(reply.article, text);
      state.history.push({ role: "user", content }, { role: "assistant", content: text });
    } catch (error) {
      reply.text.flush();
      if (error.name === "AbortError") {
        if (reply.text.text) addCopy(reply.article, reply.text.text);
      } else {
        failed(reply, "The server cannot be reached. Check your connection and try again.", question, attachments);
      }
    } finally {
      reply.article.setAttribute("aria-busy", "false");
      state.request = null;
      $("send").disabled = false;
      $("stop").hidden = true;
      followStream();
    }
  }

  // Pages of a file part (its pages string, as contentPart wrote it).
  const pagesIn = (part) => (part.type === "file" && typeof part.file.pages === "string"
    ? parsePages(part.file.pages, Infinity).length : 0);
  // Images a part counts as: an image part one, a file part its pages.
  const imagesIn = (part) => (part.type === "image_url" ? 1 : pagesIn(part));

  // Follow-up questions carry the earlier turns, images and documents included, but never more images (nor document
  // pages) than the server takes in one request: the oldest turns lose theirs first.
  function withinImageLimit(messages) {
    const mostImages = maxImages();
    const mostPages = (state.limits.documents || {}).max_pages || Infinity;
    const sum = (message, count) => (Array.isArray(message.content)
      ? message.content.reduce((total, part) => total + count(part), 0) : 0);
    let images = messages.reduce((total, message) => total + sum(message, imagesIn), 0);
    let pages = messages.reduce((total, message) => total + sum(message, pagesIn), 0);
    return messages.map((message) => {
      if ((images <= mostImages && pages <= mostPages) || !Array.isArray(message.content)
          || message === messages[messages.length - 1]) return message;
      images -= sum(message, imagesIn);
      pages -= sum(message, pagesIn);
      return { ...message, content: message.content.filter((part) => !imagesIn(part)) };
    });
  }

  // Server-sent events: the answer's pieces as they come. Returns the message of an error event (the answer was cut
  // short), or nothing.
  async function readStream(response, onText, onReasoning) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    let error = "";
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
          error = error || chunk.error.message || "the answer was cut short";
          continue;
        }
        const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
        const thinking = delta.reasoning || delta.reasoning_content;
        if (thinking) onReasoning(thinking);
        if (delta.content) onText(delta.content);
      }
    }
    return error;
  }

  // A JSON answer, shown formatted; boxes it names (bbox_2d: [x1, y1, x2, y2], 0 to 1000) drawn over the image.
  function showJson(reply, text, attachments) {
    const { answer } = reply;
    let value;
    try {
      value = JSON.parse(text);
    } catch (_) {
      turnNote(reply.article, "The answer is not complete JSON (it may have reached its length limit).");
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
    const image = attachments.find((attachment) => attachment.kind === "image");
    if (!boxes.length || !image) return;
    const figure = document.createElement("figure");
    figure.className = "overlay";
    const picture = new Image();
    picture.src = URL.createObjectURL(image.blob); // revoked on Clear
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
    for (const picture of document.querySelectorAll("#conversation img")) {
      if (picture.src.startsWith("blob:")) URL.revokeObjectURL(picture.src);
    }
    state.attachments = [];
    state.history = [];
    $("conversation").replaceChildren();
    $("question").value = "";
    renderThumbnails();
    showError("");
    note("");
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

  // Files dropped anywhere on the page are attached (a file dropped outside the drop zone would otherwise replace
  // the page, and the conversation with it).
  function wireDropping() {
    const drop = $("drop");
    const attaching = (event) => [...(event.dataTransfer ? event.dataTransfer.types : [])].includes("Files");
    document.addEventListener("dragover", (event) => {
      if (!attaching(event)) return;
      event.preventDefault();
      drop.classList.add("over");
    });
    document.addEventListener("dragleave", (event) => {
      if (!event.relatedTarget) drop.classList.remove("over");
    });
    document.addEventListener("drop", (event) => {
      if (!attaching(event)) return;
      event.preventDefault();
      drop.classList.remove("over");
      if (!$("workspace").hidden) addFiles([...event.dataTransfer.files]);
    });
    drop.addEventListener("click", () => $("files").click());
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        $("files").click();
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("schema").value = JSON.stringify(DEFAULT_SCHEMA, null, 2);
    $("password-form").addEventListener("submit", signInWithPassword);
    $("sign-out").addEventListener("click", signOut);
    $("ask-form").addEventListener("submit", ask);
    $("stop").addEventListener("click", () => state.request && state.request.abort());
    $("clear").addEventListener("click", clearConversation);
    $("files").addEventListener("change", (event) => { addFiles([...event.target.files]); event.target.value = ""; });
    wireDropping();
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
