// ComfySwap console: plain JavaScript, no build step, no third-party request.
//
// Privacy: the API key lives in sessionStorage (this tab only); dropped files are read
// into memory and sent as data: URLs; results on this host are fetched with the key and
// `cache: "no-store"` and shown through object URLs, all revoked on sign-out and when the
// tab goes away. Nothing is written to localStorage or IndexedDB.
"use strict";

const KEY_SLOT = "comfyswap.apiKey";
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
const ACTIVE_POLL_MS = 1000;
const IDLE_POLL_MS = 8000;
const ADMIN_POLL_MS = 5000;

// Error codes in words a person can act on; the API's own message follows in the card.
const PLAIN_ERRORS = {
  no_face_in_source: "No face was found in the face photo. Use a photo where one face is clearly visible.",
  no_face_in_target: "No face was found in the target (or not the face number you asked for).",
  unsupported_media: "That file is not an image or video this service can read.",
  corrupt_media: "The file could not be decoded; it may be damaged or truncated.",
  image_too_large: "The image is larger than this service accepts.",
  input_too_large: "An input file is larger than this service accepts.",
  body_too_large: "The files together are too large to send; use smaller files or URLs.",
  input_unreachable: "An input URL could not be downloaded (the host did not answer or refused).",
  input_not_found: "An input URL answered 'not found'.",
  too_many_redirects: "An input URL redirected too many times.",
  validation_failed: "A field of the request is not valid.",
  model_not_supported: "The chosen model cannot run on this deployment's face-swap engine.",
  option_not_supported: "An option is not supported by this deployment's engine.",
  lease_expired: "The runner working on this task stopped answering, and every retry was used.",
  task_timeout: "The task took longer than the time limit.",
  timeout: "The task took longer than the time limit.",
  storage_unavailable: "The result could not be saved to storage.",
  storage_upload_failed: "The result could not be saved to storage.",
  cancelled: "The task was cancelled.",
  comfyui_validation_failed: "ComfyUI refused the workflow (a node input is not valid).",
  comfyui_execution_error: "ComfyUI failed while running the workflow.",
  comfyui_unavailable: "ComfyUI could not be reached.",
  comfyui_not_configured: "This deployment has no ComfyUI for templates.",
  facefusion_failed: "FaceFusion failed on this input.",
  facefusion_unavailable: "FaceFusion could not be reached.",
  no_engine: "No runner serves this kind of task.",
  invalid_api_key: "The API refused this key: it is unknown or was revoked.",
  missing_api_key: "This API needs a key.",
  client_required: "This key may not submit or read tasks (it is not a client key).",
  admin_required: "This needs an admin key.",
  rate_limited: "Too many requests for this key; wait a moment.",
  runner_unavailable: "The runner could not be reached.",
};

const state = {
  key: null, // null: signed out; "" : open local mode
  admin: false,
  view: "signin",
  timer: null,
  cards: new Map(), // taskId -> {item, task, resultsShown}
  objectUrls: new Set(),
  files: { source: null, target: null },
  workflows: null,
};

// --- small helpers ----------------------------------------------------------------------
const $ = (selector) => document.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  for (const child of children.flat(Infinity)) if (child) node.append(child);
  return node;
}

function notice(text) {
  $("#notice").textContent = text || "";
}

function seconds(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 90) return `${value.toFixed(1)} s`;
  if (value < 5400) return `${Math.round(value / 60)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

function shortId(taskId) {
  return taskId.length > 14 ? `${taskId.slice(0, 14)}…` : taskId;
}

function plainError(error) {
  if (!error) return "";
  const plain = PLAIN_ERRORS[error.code] || "The task failed.";
  return plain;
}

function remember(objectUrl) {
  state.objectUrls.add(objectUrl);
  return objectUrl;
}

function forget(objectUrl) {
  if (objectUrl && state.objectUrls.delete(objectUrl)) URL.revokeObjectURL(objectUrl);
}

function forgetAll() {
  for (const objectUrl of state.objectUrls) URL.revokeObjectURL(objectUrl);
  state.objectUrls.clear();
}

// --- the API ----------------------------------------------------------------------------
function authHeaders(key = state.key) {
  return key ? { "X-API-Key": key } : {};
}

async function api(method, path, body, key = state.key) {
  const init = { method, headers: { Accept: "application/json", ...authHeaders(key) }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    return { status: 0, body: { error: { code: "unreachable", message: `cannot reach the API (${error})` } } };
  }
  let parsed = null;
  try {
    parsed = await response.json();
  } catch (error) {
    parsed = { error: { code: "bad_response", message: `the API answered ${response.status} without JSON` } };
  }
  if (response.status === 401 && state.key !== null && key === state.key) {
    signOut("The API no longer accepts this key. Sign in again.");
  }
  return { status: response.status, body: parsed };
}

function describeRefusal(result) {
  const error = (result.body && result.body.error) || {};
  const field = error.details && error.details.field ? ` (field ${error.details.field})` : "";
  const message = error.message || `the API answered ${result.status}`;
  const plain = PLAIN_ERRORS[error.code];
  return plain ? `${plain}\n${message}${field}` : `${message}${field}`;
}

// --- sign in / out ----------------------------------------------------------------------
async function signIn(key, { quiet = false } = {}) {
  const result = await api("GET", "/api/tasks/?limit=1", undefined, key);
  if (result.status === 200) {
    state.key = key;
    sessionStorage.setItem(KEY_SLOT, key);
    $("#api-key").value = "";
    $("#signin-error").textContent = "";
    const admin = await api("GET", "/api/admin/stats", undefined, key);
    state.admin = admin.status === 200;
    $("#nav-admin").hidden = !state.admin;
    $("#nav").hidden = false;
    notice(key ? (state.admin ? "Signed in with an admin key." : "Signed in.")
      : "This local API runs without keys (open mode): anyone who can reach it can use it.");
    show("tasks");
    return true;
  }
  if (quiet) return false;
  let message;
  if (result.status === 401) {
    message = key
      ? "This API key was refused: it is unknown or was revoked. Check that you pasted the whole key (it starts with csk_)."
      : "This API needs a key: paste one to sign in.";
  } else if (result.status === 403) {
    message = `This key cannot use the console: ${describeRefusal(result)}`;
  } else if (result.status === 0) {
    message = "Cannot reach the API. Is the service running?";
  } else {
    message = `Sign-in failed: ${describeRefusal(result)}`;
  }
  $("#signin-error").textContent = message;
  $("#api-key").focus();
  return false;
}

function signOut(message) {
  state.key = null;
  state.admin = false;
  sessionStorage.removeItem(KEY_SLOT);
  clearTimeout(state.timer);
  state.cards.clear();
  $("#task-list").replaceChildren();
  clearSwapForm();
  forgetAll();
  $("#nav").hidden = true;
  $("#nav-admin").hidden = true;
  notice("");
  show("signin");
  $("#signin-error").textContent = message || "";
  $("#api-key").focus();
}

// --- views ------------------------------------------------------------------------------
function show(view) {
  state.view = view;
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== `view-${view}`;
  }
  for (const button of document.querySelectorAll("#nav [data-view]")) {
    if (button.dataset.view === view) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  clearTimeout(state.timer);
  if (view === "tasks") refreshTasks();
  if (view === "admin") {
    refreshAdmin();
    if (!$("#engines").hasChildNodes()) checkEngines();
  }
  if (view === "swap" || view === "template") loadWorkflows();
}

// --- tasks ------------------------------------------------------------------------------
async function refreshTasks() {
  clearTimeout(state.timer);
  if (state.key === null) return;
  const result = await api("GET", "/api/tasks/?limit=50");
  if (state.key === null) return;
  let active = false;
  if (result.status === 200) {
    const tasks = result.body.tasks || [];
    $("#tasks-empty").hidden = tasks.length > 0;
    const list = $("#task-list");
    const seen = new Set();
    tasks.forEach((task, index) => {
      seen.add(task.taskId);
      const card = renderTask(task);
      if (list.children[index] !== card.item) list.insertBefore(card.item, list.children[index] || null);
      active = active || !TERMINAL.has(task.status);
    });
    for (const [taskId, card] of state.cards) {
      if (!seen.has(taskId)) {
        card.item.remove();
        state.cards.delete(taskId);
      }
    }
  } else if (result.status !== 401) {
    notice(`Could not load tasks: ${describeRefusal(result)}`);
  }
  if (state.view === "tasks") {
    state.timer = setTimeout(refreshTasks, active ? ACTIVE_POLL_MS : IDLE_POLL_MS);
  }
}

function renderTask(task) {
  let card = state.cards.get(task.taskId);
  if (!card) {
    const item = el("li", { class: "task", id: `task-${task.taskId}`, tabindex: "-1" });
    card = { item, task: null, resultsShown: false };
    state.cards.set(task.taskId, card);
  }
  const previous = card.task;
  card.task = task;
  if (previous && previous.updated_at === task.updated_at && previous.status === task.status) return card;

  const progress = task.progress || null;
  const timings = task.timings || {};
  const total = task.finished_at && task.created_at
    ? (Date.parse(task.finished_at) - Date.parse(task.created_at)) / 1000 : null;
  const header = el("header", {},
    el("strong", { text: task.workflow }),
    el("span", { class: `badge ${task.status}`, text: task.status }),
    el("span", { class: "id", title: task.taskId, text: task.taskId }),
  );
  const parts = [header];
  if (!TERMINAL.has(task.status)) {
    const value = progress ? Number(progress.value) : 0;
    const max = progress && Number(progress.max) > 0 ? Number(progress.max) : 1;
    const stage = progress && progress.stage ? progress.stage : task.status.toLowerCase();
    parts.push(el("p", { class: "stage" },
      el("span", { text: `Stage: ${stage}` }), " ",
      el("span", { class: "help", text: progress ? `(${value} of ${max})` : "" })));
    parts.push(el("progress", { value, max, "aria-label": `progress of ${task.taskId}` }));
  }
  const timing = [["queued", timings.queue_wait_s], ["download", timings.download_s],
    ["engine", timings.engine_s], ["upload", timings.upload_s], ["total", total]]
    .filter(([, value]) => value !== undefined && value !== null);
  parts.push(el("dl", {}, el("dt", { text: "created" }), el("dd", { text: new Date(task.created_at).toLocaleString() }),
    timing.map(([name, value]) => [el("dt", { text: name }), el("dd", { text: seconds(value) })])));
  if (task.error && task.status !== "COMPLETED") {
    parts.push(el("div", { class: task.status === "CANCELLED" ? "failure cancelled" : "failure",
      role: task.status === "FAILED" ? "alert" : null },
      el("p", { class: "plain", text: plainError(task.error) }),
      el("p", { class: "help" }, el("span", { text: task.error.message }), " ",
        el("code", { class: "code", text: task.error.code }),
        task.error.retryable && task.status !== "FAILED" ? " (it will be retried)" : "")));
  }
  const results = el("div", { class: "results" });
  parts.push(results);
  if (!TERMINAL.has(task.status)) {
    parts.push(el("div", { class: "actions" },
      el("button", { type: "button", class: "danger cancel", onclick: () => cancelTask(task.taskId),
        "aria-label": `Cancel ${task.taskId}` }, "Cancel")));
  }
  // Keep shown results (and a playing video) across refreshes: only the rest is rebuilt.
  const oldResults = card.item.querySelector(".results");
  card.item.replaceChildren(...parts);
  if (card.resultsShown && oldResults) results.replaceWith(oldResults);
  else if (task.status === "COMPLETED") {
    card.resultsShown = true;
    showResults(task, results);
  }
  return card;
}

function outputsOf(task) {
  const output = task.output_data || {};
  if (Array.isArray(output.outputs) && output.outputs.length) return output.outputs;
  const urls = Array.isArray(output.urls) && output.urls.length ? output.urls : (output.url ? [output.url] : []);
  return urls.map((url) => ({ url, content_type: output.content_type }));
}

async function resultSource(url) {
  // Results on this host are fetched with the key (they may be owner-only) and never
  // cached; a storage host's (signed or public) URL is used as it is.
  const target = new URL(url, window.location.href);
  if (target.origin !== window.location.origin) return target.href;
  const response = await fetch(target.href, { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) throw new Error(`the result answered ${response.status}`);
  return remember(URL.createObjectURL(await response.blob()));
}

async function showResults(task, container) {
  const outputs = outputsOf(task);
  if (!outputs.length) {
    container.append(el("p", { class: "help", text: "The task finished without an output." }));
    return;
  }
  for (const [index, output] of outputs.entries()) {
    const type = output.content_type || "";
    const isVideo = output.kind === "video" || type.startsWith("video/");
    const name = `${task.taskId}-${String(index).padStart(3, "0")}${extensionOf(output.url, type)}`;
    const figure = el("figure", {});
    container.append(figure);
    try {
      const source = await resultSource(output.url);
      const media = isVideo
        ? el("video", { src: source, controls: true, playsinline: true, preload: "metadata" })
        : el("img", { src: source, alt: `result ${index + 1} of ${task.taskId}`, class: "result" });
      figure.append(media, el("figcaption", {},
        el("a", { href: source, download: name, text: `Download ${isVideo ? "video" : "image"}` })));
    } catch (error) {
      figure.append(el("p", { class: "error", text: `The result could not be loaded: ${error.message}` }),
        el("a", { href: output.url, text: "Open the result URL" }));
    }
  }
}

function extensionOf(url, type) {
  const match = /\.([a-z0-9]{2,5})(?:$|\?)/i.exec(url || "");
  if (match) return `.${match[1]}`;
  return { "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4" }[type] || "";
}

async function cancelTask(taskId) {
  const result = await api("POST", `/api/tasks/${encodeURIComponent(taskId)}/cancel`);
  if (result.status === 200) notice(`Task ${shortId(taskId)} cancelled.`);
  else if (result.status === 409) notice(`Task ${shortId(taskId)} had already finished.`);
  else notice(`Cancel failed: ${describeRefusal(result)}`);
  refreshTasks();
}

// --- new face swap ----------------------------------------------------------------------
function setFile(field, file) {
  const zone = $(`#drop-${field}`);
  const preview = zone.querySelector("img.preview");
  const caption = zone.querySelector(".dropzone span");
  forget(preview.dataset.objectUrl);
  delete preview.dataset.objectUrl;
  state.files[field] = file || null;
  if (!file) {
    preview.hidden = true;
    preview.removeAttribute("src");
    caption.textContent = field === "source" ? "Drop a photo here, or choose a file"
      : "Drop an image or video here, or choose a file";
    return;
  }
  caption.textContent = `${file.name} (${Math.ceil(file.size / 1024)} KB)`;
  if (file.type.startsWith("image/")) {
    const objectUrl = remember(URL.createObjectURL(file));
    preview.dataset.objectUrl = objectUrl;
    preview.src = objectUrl;
    preview.alt = `preview of ${file.name}`;
    preview.hidden = false;
  } else {
    preview.hidden = true;
  }
}

function clearSwapForm() {
  setFile("source", null);
  setFile("target", null);
  for (const id of ["#source-file", "#target-file", "#source-url", "#target-url"]) $(id).value = "";
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function inputUrl(field) {
  const file = state.files[field];
  if (file) return readAsDataUrl(file);
  return $(`#${field}-url`).value.trim();
}

async function submitSwap(event) {
  event.preventDefault();
  const error = $("#swap-error");
  error.textContent = "";
  const [sourceUrl, targetUrl] = await Promise.all([inputUrl("source"), inputUrl("target")]);
  if (!sourceUrl || !targetUrl) {
    error.textContent = !sourceUrl ? "Choose a face photo (source) or paste its URL."
      : "Choose the photo or video to put the face in (target), or paste its URL.";
    return;
  }
  const faces = $("#swap-faces").value;
  const taskData = {
    source_url: sourceUrl,
    target_url: targetUrl,
    resolution: $("#swap-resolution").value.trim() || "1024x1024",
    model: $("#swap-model").value,
    face_selector: faces === "index" ? Number($("#swap-face-index").value || 0) : faces,
  };
  const button = $("#swap-form button[type=submit]");
  button.disabled = true;
  const result = await api("POST", "/api/tasks/create", { workflow: "face_swap", environment: "face_swap", task_data: taskData });
  button.disabled = false;
  if (result.status !== 200 && result.status !== 201) {
    error.textContent = `Not submitted: ${describeRefusal(result)}`;
    return;
  }
  const taskId = (result.body.task && result.body.task.taskId) || result.body.task_id || "";
  clearSwapForm();
  notice(`Face swap submitted: ${taskId}.`);
  show("tasks");
}

function wireDropZone(field) {
  const zone = $(`#drop-${field} .dropzone`);
  const input = $(`#${field}-file`);
  input.addEventListener("change", () => setFile(field, input.files[0]));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) setFile(field, file);
  });
}

// --- templates from their JSON Schema ---------------------------------------------------
async function loadWorkflows() {
  if (state.workflows) return;
  const result = await api("GET", "/api/face-swap/workflows");
  if (result.status !== 200) {
    $("#template-error").textContent = `Templates unavailable: ${describeRefusal(result)}`;
    return;
  }
  state.workflows = result.body;
  const models = result.body.face_swap_models || modelChoices(result.body.face_swap);
  if (models.length) {
    const select = $("#swap-model");
    const current = select.value;
    select.replaceChildren(...models.map((model) => el("option", { value: model, text: model })));
    if (models.includes(current)) select.value = current;
  }
  const names = Object.keys(result.body.workflows || {}).filter((name) => name !== "face_swap");
  $("#template-name").replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
  renderTemplate();
}

function modelChoices(schema) {
  const model = schema && schema.properties && schema.properties.model;
  if (!model) return [];
  return model.enum || model.examples || [];
}

function fieldSchema(property) {
  // pydantic writes optional fields as anyOf [X, null]: use X, and note it may be empty.
  if (Array.isArray(property.anyOf)) {
    const choice = property.anyOf.find((option) => option.type !== "null") || {};
    return { ...choice, ...property, anyOf: undefined, type: choice.type, enum: choice.enum };
  }
  return property;
}

function renderTemplate() {
  const name = $("#template-name").value;
  const template = state.workflows && state.workflows.workflows[name];
  const fields = $("#template-fields");
  fields.replaceChildren();
  if (!template) return;
  $("#template-description").textContent = template.description || "";
  const schema = template.parameters || {};
  const required = new Set(schema.required || []);
  for (const [field, raw] of Object.entries(schema.properties || {})) {
    const property = fieldSchema(raw);
    const id = `tpl-${field}`;
    const label = el("label", { for: id, text: `${property.title || field}${required.has(field) ? " (required)" : ""}` });
    const help = property.description ? el("p", { class: "help", id: `${id}-help`, text: property.description }) : null;
    const common = { id, name: field, "data-type": property.type || "string", "aria-describedby": help ? `${id}-help` : null,
      required: required.has(field) };
    let input;
    if (Array.isArray(property.enum)) {
      input = el("select", common, required.has(field) ? [] : el("option", { value: "", text: "(default)" }),
        property.enum.map((value) => el("option", { value, text: value })));
      if (property.default !== undefined && property.default !== null) input.value = String(property.default);
    } else if (property.type === "boolean") {
      input = el("input", { ...common, type: "checkbox", checked: property.default === true });
    } else if (property.type === "integer" || property.type === "number") {
      input = el("input", { ...common, type: "number", min: property.minimum ?? property.exclusiveMinimum,
        max: property.maximum ?? property.exclusiveMaximum, step: property.type === "integer" ? 1 : "any",
        value: property.default ?? "", placeholder: property.default === null ? "random / default" : null });
    } else if ((property.maxLength || 0) > 256) {
      input = el("textarea", { ...common, rows: 3, maxlength: property.maxLength });
      input.value = property.default ?? "";
    } else {
      input = el("input", { ...common, type: field.endsWith("_url") ? "url" : "text", value: property.default ?? "",
        maxlength: property.maxLength });
    }
    const parts = [label, input, help];
    if (field.endsWith("_url")) {
      const fileId = `${id}-file`;
      parts.push(el("label", { for: fileId, text: "or a file" }),
        el("input", { id: fileId, type: "file", accept: "image/*", "data-for": field }));
    }
    fields.append(el("div", { class: "field" }, parts));
  }
}

async function submitTemplate(event) {
  event.preventDefault();
  const error = $("#template-error");
  error.textContent = "";
  const name = $("#template-name").value;
  const taskData = {};
  for (const input of $("#template-fields").querySelectorAll("[name]")) {
    const field = input.name;
    const file = $(`#template-fields input[type=file][data-for="${field}"]`);
    if (file && file.files[0]) {
      taskData[field] = await readAsDataUrl(file.files[0]);
      continue;
    }
    if (input.type === "checkbox") taskData[field] = input.checked;
    else if (input.value === "") continue; // the template's default applies
    else if (input.dataset.type === "integer" || input.dataset.type === "number") taskData[field] = Number(input.value);
    else taskData[field] = input.value;
  }
  const result = await api("POST", "/api/tasks/create", { workflow: name, task_data: taskData });
  if (result.status !== 200 && result.status !== 201) {
    error.textContent = `Not submitted: ${describeRefusal(result)}`;
    return;
  }
  notice(`Template ${name} submitted.`);
  show("tasks");
}

// --- admin ------------------------------------------------------------------------------
async function refreshAdmin() {
  clearTimeout(state.timer);
  const result = await api("GET", "/api/admin/stats");
  if (state.view !== "admin") return;
  if (result.status === 200) renderAdmin(result.body);
  else notice(`Could not load fleet numbers: ${describeRefusal(result)}`);
  state.timer = setTimeout(refreshAdmin, ADMIN_POLL_MS);
}

function renderAdmin(stats) {
  const queue = stats.queue || {};
  const hour = stats.last_hour || {};
  const finished = hour.finished || {};
  $("#fig-queue").textContent = String(queue.queue_length ?? "–");
  $("#fig-oldest").textContent = queue.oldest_pending_age_s === null ? "none" : seconds(queue.oldest_pending_age_s);
  $("#fig-running").textContent = String((queue.fetched || 0) + (queue.processing || 0));
  $("#fig-finished").textContent =
    `${finished.completed || 0} done · ${finished.failed || 0} failed${hour.truncated ? " (at least)" : ""}`;
  $("#chart-throughput").replaceChildren(throughputChart(hour.per_minute || []));
  $("#chart-failures").replaceChildren(failuresChart(hour.failures_by_code || {}));
  renderRunners(stats.runners || []);
}

function throughputChart(buckets) {
  const width = 600, height = 140, pad = 24;
  const totals = buckets.map((b) => b.completed + b.failed + b.cancelled);
  const top = Math.max(1, ...totals);
  const step = (width - pad) / Math.max(1, buckets.length);
  const scale = (height - pad) / top;
  const sum = totals.reduce((a, b) => a + b, 0);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${sum} tasks finished in the last hour, at most ${top} in one minute` });
  chart.append(svg("title", {}, document.createTextNode("Tasks finished per minute, last hour")));
  buckets.forEach((bucket, index) => {
    let y = height - pad;
    for (const [key, color] of [["completed", "#1a7f37"], ["failed", "#c0302b"], ["cancelled", "#8c959f"]]) {
      if (!bucket[key]) continue;
      const h = bucket[key] * scale;
      y -= h;
      const bar = svg("rect", { x: pad + index * step, y, width: Math.max(1, step - 1), height: h, fill: color });
      bar.append(svg("title", {}, document.createTextNode(`${new Date(bucket.start).toLocaleTimeString()}: ${bucket[key]} ${key}`)));
      chart.append(bar);
    }
  });
  chart.append(svg("line", { x1: pad, y1: height - pad, x2: width, y2: height - pad, stroke: "#57606a" }));
  const label = (x, y, text, anchor = "start") => {
    const node = svg("text", { x, y, "font-size": 11, fill: "#57606a", "text-anchor": anchor });
    node.textContent = text;
    return node;
  };
  chart.append(label(pad, height - 6, "60 min ago"), label(width, height - 6, "now", "end"),
    label(pad - 4, 12, String(top), "end"), label(pad - 4, height - pad, "0", "end"));
  return el("div", {}, chart, el("p", { class: "legend",
    text: "green: completed · red: failed · grey: cancelled (per minute)" }));
}

function failuresChart(failures) {
  const entries = Object.entries(failures);
  if (!entries.length) return el("p", { class: "help", text: "No failures in the last hour." });
  const width = 600, row = 22, labelWidth = 220;
  const top = Math.max(...entries.map(([, count]) => count));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${entries.length * row + 4}`, role: "img",
    "aria-label": entries.map(([code, count]) => `${code}: ${count}`).join(", ") });
  entries.forEach(([code, count], index) => {
    const y = index * row + 2;
    const name = svg("text", { x: 4, y: y + 15, "font-size": 12, fill: "#1b1f24" });
    name.textContent = code;
    const bar = svg("rect", { x: labelWidth, y: y + 3, height: row - 8, fill: "#c0302b",
      width: Math.max(2, ((width - labelWidth - 40) * count) / top) });
    const value = svg("text", { x: labelWidth + ((width - labelWidth - 40) * count) / top + 6, y: y + 15, "font-size": 12 });
    value.textContent = String(count);
    chart.append(name, bar, value);
  });
  return chart;
}

function renderRunners(runners) {
  const box = $("#runners");
  if (!runners.length) {
    box.replaceChildren(el("p", { class: "help", text: "No runner holds a task right now." }));
    return;
  }
  const rows = runners.flatMap((runner) => runner.in_flight.map((task, index) => el("tr", {},
    el("td", { text: index === 0 ? runner.worker_id : "" }),
    el("td", { class: "id", title: task.task_id, text: shortId(task.task_id) }),
    el("td", { text: task.workflow }),
    el("td", { text: task.status }),
    el("td", { text: task.progress ? `${task.progress.stage} ${task.progress.value}/${task.progress.max}` : "–" }),
  )));
  box.replaceChildren(el("div", { class: "table-wrap" }, el("table", {},
    el("thead", {}, el("tr", {}, ["Runner", "Task", "Workflow", "Status", "Progress"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows))));
}

async function checkEngines() {
  const box = $("#engines");
  box.replaceChildren(el("p", { class: "help", text: "Asking a runner…" }));
  const result = await api("GET", "/api/runner/health");
  if (result.status === 404) {
    // A gateway that keeps runner routes closed (runner_ops off) answers from get_task.
    box.replaceChildren(el("p", { class: "help", text: "This deployment does not route runner health "
      + "through the API host (the gateway's runner_ops setting is off): see the monitoring dashboard." }));
    return;
  }
  if (result.status !== 200) {
    box.replaceChildren(el("p", { class: "error", text: `No runner answered: ${describeRefusal(result)}` }));
    return;
  }
  const body = result.body;
  const status = (value) => el("span", { class: ["available", "healthy", "configured", "ok"].includes(value) ? "ok" : "bad", text: value });
  const engineRows = Object.entries(body.engines || {}).map(([name, health]) => el("tr", {},
    el("td", { text: name }), el("td", {}, status(health.status || "unknown")),
    el("td", { text: health.engine || "" }),
    el("td", { text: health.error || (health.models ? `models: ${[].concat(health.models).join(", ")}` : "") })));
  const providers = (body.storage && body.storage.providers) || [];
  const storageRows = providers.map((provider) => el("tr", {},
    el("td", { text: provider.provider }), el("td", {}, status(provider.status || "unknown")),
    el("td", { text: provider.error || provider.bucket || provider.base_url || "" })));
  const worker = body.worker || {};
  box.replaceChildren(
    el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, ["Engine", "Status", "Kind", "Detail"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, engineRows))),
    el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, ["Storage provider", "Status", "Detail"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, storageRows))),
    el("p", { class: "help", text: `Runner ${worker.worker_id || "?"}: ${worker.held ?? 0} of ${worker.capacity ?? "?"} slots held, `
      + `${worker.completed ?? 0} completed, ${worker.failed ?? 0} failed since start; up ${seconds(body.uptime_s)}.` }),
  );
}

// --- start ------------------------------------------------------------------------------
function start() {
  $("#signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("#api-key").value.trim());
  });
  $("#sign-out").addEventListener("click", () => signOut("Signed out."));
  for (const button of document.querySelectorAll("#nav [data-view]")) {
    button.addEventListener("click", () => {
      show(button.dataset.view);
      // Keyboard and screen-reader users land on the view they opened.
      $("#main").focus();
    });
  }
  $("#refresh-tasks").addEventListener("click", refreshTasks);
  $("#refresh-admin").addEventListener("click", refreshAdmin);
  $("#check-engines").addEventListener("click", checkEngines);
  $("#swap-form").addEventListener("submit", submitSwap);
  $("#template-form").addEventListener("submit", submitTemplate);
  $("#template-name").addEventListener("change", renderTemplate);
  $("#swap-faces").addEventListener("change", () => {
    for (const node of document.querySelectorAll(".face-index")) node.hidden = $("#swap-faces").value !== "index";
  });
  wireDropZone("source");
  wireDropZone("target");
  // Nothing of a face outlives the tab: previews and fetched results are revoked.
  window.addEventListener("pagehide", () => { clearSwapForm(); forgetAll(); });
  window.addEventListener("pageshow", (event) => {
    if (!event.persisted || state.key === null) return;
    // Back from the page cache: the results' object URLs were revoked, so fetch again.
    state.cards.clear();
    $("#task-list").replaceChildren();
    show(state.view);
  });

  const saved = sessionStorage.getItem(KEY_SLOT);
  if (saved !== null) {
    signIn(saved, { quiet: true }).then((ok) => { if (!ok) signOut("Your saved key was refused. Sign in again."); });
  } else {
    // A local `make run` without keys answers without one: go straight in, and say so.
    signIn("", { quiet: true }).then((ok) => { if (!ok) $("#api-key").focus(); });
  }
}

document.addEventListener("DOMContentLoaded", start);
