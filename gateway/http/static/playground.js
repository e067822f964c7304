// The playground: a form over POST /v1/image-to-image, run as an asynchronous job and followed on its event stream.
// Plain JavaScript, no build step, no inline code (the page's Content-Security-Policy allows scripts from this
// origin only). The API key stays in the browser and only ever travels in an Authorization header.
"use strict";

(() => {
  const API = "v1/"; // relative to the page (served at / and /playground), so a path prefix keeps working
  const KEY_ITEM = "imagen.playground.apiKey";
  const TERMINAL = new Set(["completed", "failed", "canceled"]);
  const POLL_MS = 1000; // only when the event stream breaks off before the job ends
  const CATALOG_DELAY_MS = 300; // wait for typing to pause before reloading models and styles with a new key

  // The request's parameters after `image`, in form order. Adding one is a line here: its control, and for a
  // select where its choices come from; numbers take their range and default from GET /v1/models (`limits`,
  // and the chosen model's `defaults`), text its length cap. The body, the curl command and error placement
  // all follow from this table. An empty control is left out of the body (the API's default applies). A field
  // with `only: "mask"` sits with the mask's controls and is shown and sent only with a painted mask.
  const FIELDS = [
    { name: "prompt", label: "Prompt", control: "textarea", placeholder: "a watercolor fox in the snow" },
    { name: "negative_prompt", label: "Negative prompt", control: "textarea", placeholder: "blurry, low quality" },
    { name: "model", label: "Model", control: "select", choices: (c) => c.models.map((m) => [m.id, m.id]) },
    {
      name: "style",
      label: "Style",
      control: "select",
      choices: (c) => [["", "none"], ...c.styles.map((s) => [s.id, s.id])],
    },
    { name: "strength", label: "Strength", control: "number" },
    { name: "steps", label: "Steps", control: "number" },
    { name: "guidance_scale", label: "Guidance scale", control: "number" },
    { name: "seed", label: "Seed", control: "number", placeholder: "random" },
    { name: "num_images", label: "Images", control: "number" },
    {
      name: "scheduler",
      label: "Scheduler",
      control: "select",
      choices: (c, model) => [
        ["", model ? `model default (${model.default_scheduler})` : "model default"],
        ...(model ? model.schedulers : []).map((s) => [s, s]),
      ],
    },
    {
      name: "output_format",
      label: "Output format",
      control: "select",
      choices: (c) => c.limits.output_format.enum.map((f) => [f, f]),
    },
    { name: "output_quality", label: "Output quality", control: "number", placeholder: "format default" },
    // Its `limits` default is null (it exists only with a mask): the placeholder is `default_with_mask`.
    { name: "mask_blur", label: "Mask blur", control: "number", only: "mask" },
  ];
  // Errors about the image, the model or the key, whatever their message names.
  const FIELD_OF_CODE = {
    invalid_image: "image",
    image_too_large: "image",
    image_dimensions_too_large: "image",
    url_not_allowed: "image",
    model_not_found: "model",
    unauthorized: "api_key",
  };

  const $ = (id) => document.getElementById(id);
  const form = $("request-form");
  const keyInput = $("api-key");
  const rememberBox = $("remember-key");
  const fileInput = $("image-file");
  const urlInput = $("image-url");
  const dropZone = $("drop-zone");
  const progressBar = $("progress");
  const statusLine = $("status");
  const progressLog = $("progress-log");
  const results = $("results");
  const submitButton = $("submit");
  const cancelButton = $("cancel");
  const curlBox = $("curl");
  const maskField = $("mask-field");
  const maskCanvas = $("mask-canvas");
  const maskBrush = $("mask-brush");
  const maskPaint = $("mask-paint");
  const maskErase = $("mask-erase");

  let catalog = null; // { limits, models, styles, defaultModel }
  let image = null; // { value: data URI or URL, fileName?, mime? }
  let job = null; // { id, abort: AbortController }
  const edited = new Set(); // parameters the user changed: a model's defaults no longer replace them

  class ApiError extends Error {
    constructor(status, error) {
      super(error.message);
      this.status = status;
      this.error = error; // the API's { code, message, details }
    }
  }

  // --- the API key: sessionStorage (this tab) or localStorage (remembered), never a URL ------------------------

  function loadKey() {
    const remembered = localStorage.getItem(KEY_ITEM);
    rememberBox.checked = remembered !== null;
    keyInput.value = remembered ?? sessionStorage.getItem(KEY_ITEM) ?? "";
  }

  function saveKey() {
    const key = keyInput.value.trim();
    localStorage.removeItem(KEY_ITEM);
    sessionStorage.removeItem(KEY_ITEM);
    if (key) (rememberBox.checked ? localStorage : sessionStorage).setItem(KEY_ITEM, key);
  }

  function headers(extra = {}) {
    const out = { ...extra };
    const key = keyInput.value.trim();
    if (key) out.Authorization = `Bearer ${key}`;
    return out;
  }

  async function errorOf(response) {
    const payload = await response.json().catch(() => null);
    const error = payload && payload.error && payload.error.message ? payload.error : null;
    return new ApiError(response.status, error ?? { code: `http_${response.status}`, message: `HTTP ${response.status}`, details: null });
  }

  async function call(method, path, body, extra = {}) {
    const init = { method, headers: headers(extra), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(API + path, init);
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  // --- the form, built from FIELDS ------------------------------------------------------------------------------

  function control(field) {
    return $(`field-${field.name}`);
  }

  function buildFields() {
    for (const field of FIELDS) {
      const holder = $(field.only ? `${field.only}-parameters` : "parameters");
      const wrap = document.createElement("div");
      wrap.className = `field field-${field.control}`;
      wrap.dataset.field = field.name;
      const label = document.createElement("label");
      label.htmlFor = `field-${field.name}`;
      label.textContent = field.label;
      const tag = field.control === "number" ? "input" : field.control;
      const input = document.createElement(tag);
      input.id = `field-${field.name}`;
      input.name = field.name;
      if (field.control === "number") input.type = "number";
      if (field.control === "textarea") input.rows = 2;
      if (field.placeholder) input.placeholder = field.placeholder;
      input.addEventListener("input", () => edited.add(field.name));
      const hint = document.createElement("p");
      hint.className = "hint";
      hint.id = `hint-${field.name}`;
      const error = document.createElement("p");
      error.className = "field-error";
      error.id = `error-${field.name}`;
      error.setAttribute("role", "alert");
      wrap.append(label, input, hint, error);
      holder.append(wrap);
    }
  }

  function selectedModel() {
    if (!catalog) return null;
    const id = control({ name: "model" }).value || catalog.defaultModel;
    return catalog.models.find((m) => m.id === id) ?? null;
  }

  // Ranges and length caps from `limits`; defaults from the chosen model, else from `limits`.
  function applyLimits() {
    const model = selectedModel();
    for (const field of FIELDS) {
      const input = control(field);
      const limits = catalog.limits[field.name];
      if (field.control === "select") continue;
      if (!limits) continue;
      if (limits.type === "string") {
        input.maxLength = limits.max_length;
        $(`hint-${field.name}`).textContent = `at most ${limits.max_length} characters`;
        continue;
      }
      input.min = String(limits.minimum);
      input.max = String(limits.maximum);
      input.step = limits.type === "integer" ? "1" : "any";
      const fallback = model && model.defaults[field.name] !== undefined ? model.defaults[field.name] : limits.default;
      if (!edited.has(field.name)) input.value = fallback === null || fallback === undefined ? "" : String(fallback);
      const range = `${limits.minimum} to ${limits.maximum}`;
      const known = fallback !== null && fallback !== undefined;
      // A default that applies only with another field (mask_blur's, with a mask) is shown, not filled in.
      const conditional = limits.default_with_mask;
      if (conditional !== undefined) input.placeholder = String(conditional);
      const note = conditional !== undefined ? `default ${conditional}` : field.note;
      const hint = known ? `${range}, default ${fallback}` : [range, note].filter(Boolean).join(", ");
      $(`hint-${field.name}`).textContent = hint;
    }
  }

  function fillChoices() {
    for (const field of FIELDS) {
      if (field.control !== "select") continue;
      const select = control(field);
      const previous = select.value;
      select.replaceChildren(
        ...field.choices(catalog, selectedModel()).map(([value, text]) => {
          const option = document.createElement("option");
          option.value = value;
          option.textContent = text;
          return option;
        }),
      );
      const values = [...select.options].map((o) => o.value);
      if (values.includes(previous)) select.value = previous;
      else if (field.name === "model" && values.includes(catalog.defaultModel)) select.value = catalog.defaultModel;
    }
  }

  async function loadCatalog() {
    clearError("api_key");
    try {
      const [models, styles] = await Promise.all([call("GET", "models"), call("GET", "styles")]);
      catalog = { limits: models.limits, models: models.data, styles: styles.data, defaultModel: models.default };
      fillChoices();
      applyLimits();
      form.dataset.ready = "true";
      if (!job) setStatus(`Ready: ${catalog.models.length} model(s), ${catalog.styles.length} style(s).`);
    } catch (error) {
      form.dataset.ready = "false";
      showError(error);
    }
  }

  // The JSON body: `image`, the painted mask if any, then every non-empty parameter (numbers as numbers; what is
  // not one is sent as typed, so the API names the problem). Mask parameters go only with a mask.
  function requestBody() {
    const body = {};
    if (image) body.image = image.value;
    const mask = maskValue();
    if (mask) body.mask = mask;
    for (const field of FIELDS) {
      if (field.only === "mask" && !mask) continue;
      const raw = control(field).value;
      if (raw.trim() === "") continue;
      if (field.control === "number") {
        const number = Number(raw);
        body[field.name] = Number.isFinite(number) ? number : raw;
      } else {
        body[field.name] = raw;
      }
    }
    return body;
  }

  // --- the input image: a file (chosen, dropped or pasted) or a URL ---------------------------------------------

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  let previewUrl = null;

  function preview(src, caption) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = src.startsWith("blob:") ? src : null;
    const img = $("input-preview");
    $("input-caption").textContent = caption;
    hideMask(); // a mask belongs to its image: a new one starts unmasked
    img.onload = () => {
      $("input-caption").textContent = `${caption} · ${img.naturalWidth}×${img.naturalHeight}`;
      showMask(img.naturalWidth, img.naturalHeight);
    };
    img.onerror = hideMask;
    img.src = src;
    $("input-figure").hidden = false;
  }

  async function pickFile(file) {
    if (!file) return;
    clearError("image");
    image = { value: await readAsDataUrl(file), fileName: file.name, mime: file.type || "image/png" };
    urlInput.value = "";
    preview(URL.createObjectURL(file), `Input: ${file.name}`);
  }

  function pickUrl() {
    clearError("image");
    const url = urlInput.value.trim();
    if (!url) return;
    fileInput.value = "";
    image = { value: url };
    preview(url, "Input: URL");
  }

  // --- the mask: painted over the input preview --------------------------------------------------------------
  // The canvas has the image's own (upright) pixel size and holds only the strokes (never the image, so it is
  // never tainted, even for a URL input): opaque where painted, transparent elsewhere. It is shown tinted over
  // the preview; the request gets it as an opaque black-and-white PNG (white: change, black: keep).

  const MASK_TINT = "#ff2d95"; // how strokes show over the image; the PNG sent is white where they are
  const maskContext = maskCanvas.getContext("2d", { willReadFrequently: true });
  let maskEmpty = true; // nothing painted (kept up to date at the end of each stroke)
  let erasing = false;
  let stroke = null; // the pointer drawing now: { id, x, y }

  function hideMask() {
    stroke = null;
    maskContext.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
    maskCanvas.hidden = true;
    maskField.hidden = true;
    clearError("mask");
    maskChanged(true);
  }

  function showMask(width, height) {
    maskCanvas.width = width; // also clears it
    maskCanvas.height = height;
    maskCanvas.hidden = false;
    maskField.hidden = false;
    maskChanged(true);
  }

  function clearMask() {
    maskContext.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
    maskChanged(true);
  }

  // Whether any pixel is painted: one read of the canvas (after an erase, which may have emptied it).
  function anyPainted() {
    const { data } = maskContext.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return true;
    return false;
  }

  function maskChanged(empty) {
    maskEmpty = empty;
    maskField.dataset.painted = String(!empty);
    for (const field of FIELDS) if (field.only === "mask") control(field).closest(".field").hidden = empty;
  }

  // null when nothing is painted; else a PNG data URI, opaque: black, and white where the strokes are.
  function maskValue() {
    if (maskEmpty || maskField.hidden) return null;
    const { width, height } = maskCanvas;
    const white = document.createElement("canvas");
    white.width = width;
    white.height = height;
    const whiteContext = white.getContext("2d");
    whiteContext.drawImage(maskCanvas, 0, 0);
    whiteContext.globalCompositeOperation = "source-in"; // the strokes' coverage, in white
    whiteContext.fillStyle = "#fff";
    whiteContext.fillRect(0, 0, width, height);
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const outContext = out.getContext("2d");
    outContext.fillStyle = "#000";
    outContext.fillRect(0, 0, width, height);
    outContext.drawImage(white, 0, 0);
    return out.toDataURL("image/png");
  }

  function setErasing(value) {
    erasing = value;
    maskPaint.setAttribute("aria-pressed", String(!value));
    maskErase.setAttribute("aria-pressed", String(value));
  }

  function showBrush() {
    $("mask-brush-size").textContent = `${maskBrush.value} px`;
  }

  // A pointer position in image pixels (the canvas is scaled to the preview's width).
  function imagePoint(event) {
    const box = maskCanvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * maskCanvas.width) / Math.max(1, box.width),
      y: ((event.clientY - box.top) * maskCanvas.height) / Math.max(1, box.height),
    };
  }

  function drawTo(point) {
    maskContext.globalCompositeOperation = erasing ? "destination-out" : "source-over";
    maskContext.strokeStyle = maskContext.fillStyle = MASK_TINT;
    maskContext.lineWidth = Number(maskBrush.value);
    maskContext.lineCap = maskContext.lineJoin = "round";
    maskContext.beginPath();
    if (point.x === stroke.x && point.y === stroke.y) {
      maskContext.arc(point.x, point.y, maskContext.lineWidth / 2, 0, 2 * Math.PI); // a dot: a click
      maskContext.fill();
    } else {
      maskContext.moveTo(stroke.x, stroke.y);
      maskContext.lineTo(point.x, point.y);
      maskContext.stroke();
    }
    stroke.x = point.x;
    stroke.y = point.y;
  }

  function wireMask() {
    maskCanvas.hidden = true; // until an image is loaded
    maskChanged(true);
    maskCanvas.addEventListener("pointerdown", (event) => {
      if (event.button !== 0 || stroke) return;
      event.preventDefault();
      maskCanvas.setPointerCapture(event.pointerId);
      const point = imagePoint(event);
      stroke = { id: event.pointerId, ...point };
      drawTo(point);
      if (!erasing) maskChanged(false);
    });
    maskCanvas.addEventListener("pointermove", (event) => {
      if (!stroke || event.pointerId !== stroke.id) return;
      const moves = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
      for (const move of moves.length ? moves : [event]) drawTo(imagePoint(move));
    });
    const end = (event) => {
      if (!stroke || event.pointerId !== stroke.id) return;
      stroke = null;
      if (erasing) maskChanged(!anyPainted());
    };
    maskCanvas.addEventListener("pointerup", end);
    maskCanvas.addEventListener("pointercancel", end);
    maskBrush.addEventListener("input", showBrush);
    maskPaint.addEventListener("click", () => setErasing(false));
    maskErase.addEventListener("click", () => setErasing(true));
    $("mask-clear").addEventListener("click", clearMask);
    showBrush();
  }

  // --- errors, next to the field they concern ----------------------------------------------------------------

  // The field an error concerns: the one its message names ("Invalid field 'mask'": a mask that fails to decode
  // keeps the image's code), else the one its code implies, else any field quoted in its message or details.
  function fieldOf(error) {
    const named = /^(?:Invalid|Missing required) field '([a-z_]+)'/.exec(error.message ?? "");
    if (named && $(`error-${named[1]}`)) return named[1];
    if (FIELD_OF_CODE[error.code]) return FIELD_OF_CODE[error.code];
    const text = `${error.message} ${error.details ?? ""}`;
    for (const match of text.matchAll(/'([a-z_]+)'/g)) {
      if ($(`error-${match[1]}`)) return match[1];
    }
    return "general";
  }

  function clearError(name) {
    const box = $(`error-${name}`);
    box.replaceChildren();
    box.closest(".field")?.classList.remove("invalid");
  }

  function clearErrors() {
    for (const box of document.querySelectorAll(".field-error")) {
      box.replaceChildren();
      box.closest(".field")?.classList.remove("invalid");
    }
  }

  function showError(error) {
    const api =
      error instanceof ApiError ? error.error : { code: "network_error", message: String(error.message ?? error), details: null };
    const name = fieldOf(api);
    const box = $(`error-${name}`);
    const message = document.createElement("strong");
    message.className = "error-message";
    message.textContent = api.message;
    box.replaceChildren(message);
    if (api.details) {
      const details = document.createElement("span");
      details.className = "error-details";
      details.textContent = ` ${api.details}`;
      box.append(details);
    }
    box.dataset.code = api.code;
    box.closest(".field")?.classList.add("invalid");
    const target = $(`field-${name}`) ?? { api_key: keyInput, mask: maskBrush }[name] ?? null;
    if (target) target.focus();
    setStatus(`Error: ${api.message}`);
  }

  // --- the job: create, follow its event stream, cancel --------------------------------------------------------

  function setStatus(text) {
    statusLine.textContent = text;
  }

  function setBusy(busy) {
    submitButton.disabled = busy;
    cancelButton.disabled = !busy;
    form.dataset.busy = String(busy);
  }

  let lastLogged = "";

  function showProgress(view) {
    const progress = view.progress ?? { step: 0, total_steps: view.effective_steps, queue_position: null };
    progressBar.max = Math.max(1, progress.total_steps);
    progressBar.value = progress.step;
    let text = `${view.status}: step ${progress.step} of ${progress.total_steps}`;
    if (progress.queue_position !== null) text += `, queue position ${progress.queue_position}`;
    setStatus(text);
    if (text === lastLogged) return;
    lastLogged = text;
    const entry = document.createElement("li");
    entry.textContent = text;
    entry.dataset.status = view.status;
    entry.dataset.step = String(progress.step);
    entry.dataset.total = String(progress.total_steps);
    progressLog.append(entry);
  }

  // Server-sent events over fetch (EventSource cannot send an Authorization header): yields { event, data }.
  async function* serverSentEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "message";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const raw of lines) {
          const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
          if (line === "") {
            if (data.length) yield { event: name, data: data.join("\n") };
            name = "message";
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue; // a keep-alive comment
          const colon = line.indexOf(":");
          const key = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (key === "event") name = value;
          else if (key === "data") data.push(value);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  async function follow(view, signal) {
    let current = view;
    if (TERMINAL.has(current.status)) return current;
    const path = `image-to-image/${encodeURIComponent(current.id)}`;
    try {
      const response = await fetch(`${API}${path}/events`, {
        headers: headers({ Accept: "text/event-stream" }),
        cache: "no-store",
        signal,
      });
      if (!response.ok) throw await errorOf(response);
      for await (const event of serverSentEvents(response.body)) {
        if (event.event !== "job") continue;
        current = JSON.parse(event.data);
        showProgress(current);
        if (TERMINAL.has(current.status)) return current;
      }
    } catch (error) {
      if (error instanceof ApiError || error.name === "AbortError") throw error;
      // The stream broke off (a proxy, the network): poll the job instead.
    }
    while (!TERMINAL.has(current.status)) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      current = await call("GET", path);
      showProgress(current);
    }
    return current;
  }

  async function submit() {
    clearErrors();
    clearResults();
    setBusy(true);
    const abort = new AbortController();
    try {
      const created = await call("POST", "image-to-image", requestBody(), { Prefer: "respond-async" });
      job = { id: created.id, abort };
      form.dataset.job = created.id;
      showProgress(created);
      const final = await follow(created, abort.signal);
      if (final.status === "completed") {
        showResults(final);
        setStatus(`completed: ${final.images.length} image(s), ${final.effective_steps} denoising steps each.`);
      } else if (final.status === "failed" && final.error) {
        showError(new ApiError(0, final.error));
      } else {
        setStatus(`Job ${final.status}.`);
      }
    } catch (error) {
      if (error.name !== "AbortError") showError(error);
    } finally {
      job = null;
      setBusy(false);
    }
  }

  async function cancel() {
    if (!job) return;
    cancelButton.disabled = true;
    setStatus("Canceling…");
    try {
      await call("POST", `image-to-image/${encodeURIComponent(job.id)}/cancel`); // the stream then ends with it
    } catch (error) {
      showError(error);
    }
  }

  // --- results: side by side with the input, each with its seed, size and a download link ---------------------

  function clearResults() {
    for (const old of results.querySelectorAll(".result.output")) old.remove();
    progressLog.replaceChildren();
    progressBar.value = 0;
    lastLogged = "";
    delete form.dataset.job;
  }

  function useSeed(seed) {
    const input = control({ name: "seed" });
    input.value = String(seed);
    edited.add("seed");
    const count = control({ name: "num_images" });
    count.value = "1";
    edited.add("num_images");
    input.focus();
    setStatus(`Seed ${seed} set: Generate reproduces that image.`);
  }

  function showResults(view) {
    view.images.forEach((output, index) => {
      const figure = document.createElement("figure");
      figure.className = "result output";
      figure.dataset.seed = String(output.seed);
      const img = document.createElement("img");
      img.src = output.url; // outputs are capability URLs: served without the key
      img.alt = `Result ${index + 1}, seed ${output.seed}`;
      const caption = document.createElement("figcaption");
      const seed = document.createElement("span");
      seed.className = "seed";
      seed.textContent = `seed ${output.seed}`;
      const size = document.createElement("span");
      size.className = "size";
      size.textContent = `${output.width}×${output.height}`;
      const download = document.createElement("a");
      download.className = "download";
      download.href = output.url;
      download.download = output.url.split("/").pop();
      download.textContent = "Download";
      const reuse = document.createElement("button");
      reuse.type = "button";
      reuse.className = "reuse-seed";
      reuse.textContent = "Use seed";
      reuse.addEventListener("click", () => useSeed(output.seed));
      caption.append(seed, " · ", size, " · ", download, " ", reuse);
      figure.append(img, caption);
      results.append(figure);
    });
  }

  // --- copy as curl ----------------------------------------------------------------------------------------------

  const shellQuote = (text) => `'${text.replaceAll("'", "'\\''")}'`;

  // A command that sends this request (synchronously: curl prints the finished job). The key is read from
  // $IMAGEN_API_KEY, never copied; a chosen file is base64-encoded by the shell instead of pasted inline.
  function curlCommand() {
    const body = requestBody();
    const placeholder = `__image_${Date.now()}__`;
    const fromFile = image && image.fileName;
    if (fromFile) body.image = placeholder;
    // An unquoted here-document, so the shell fills in the file; escape what it would expand itself.
    let json = JSON.stringify(body, null, 2).replace(/[\\$`]/g, "\\$&");
    if (fromFile) {
      const encoded = `data:${image.mime};base64,$(base64 < ${shellQuote(image.fileName)} | tr -d '\\n')`;
      json = json.replace(placeholder, encoded);
    }
    const url = new URL(`${API}image-to-image`, document.baseURI).href;
    const lines = [`curl -sS -X POST ${shellQuote(url)} \\`, "  -H 'Content-Type: application/json' \\"];
    if (keyInput.value.trim()) lines.push('  -H "Authorization: Bearer $IMAGEN_API_KEY" \\');
    lines.push("  --data-binary @- <<JSON", json, "JSON");
    return lines.join("\n");
  }

  async function copyCurl() {
    const command = curlCommand();
    curlBox.value = command;
    curlBox.hidden = false;
    curlBox.rows = Math.min(16, command.split("\n").length);
    try {
      await navigator.clipboard.writeText(command);
      setStatus("curl command copied (set IMAGEN_API_KEY in your shell).");
    } catch {
      curlBox.select();
      setStatus("Select the curl command below and copy it (set IMAGEN_API_KEY in your shell).");
    }
  }

  // --- wiring ------------------------------------------------------------------------------------------------------

  function start() {
    buildFields();
    wireMask();
    loadKey();
    let timer = null;
    keyInput.addEventListener("input", () => {
      saveKey();
      clearTimeout(timer);
      timer = setTimeout(loadCatalog, CATALOG_DELAY_MS);
    });
    rememberBox.addEventListener("change", saveKey);
    control({ name: "model" }).addEventListener("change", () => {
      if (!catalog) return;
      fillChoices(); // the scheduler list is the chosen model's
      applyLimits();
    });
    fileInput.addEventListener("change", () => pickFile(fileInput.files[0]).catch(showError));
    urlInput.addEventListener("change", pickUrl);
    dropZone.addEventListener("dragover", (event) => {
      event.preventDefault();
      dropZone.classList.add("over");
    });
    dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
    dropZone.addEventListener("drop", (event) => {
      event.preventDefault();
      dropZone.classList.remove("over");
      pickFile(event.dataTransfer.files[0]).catch(showError);
    });
    document.addEventListener("paste", (event) => {
      const file = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
      if (file) pickFile(file).catch(showError);
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submit();
    });
    cancelButton.addEventListener("click", cancel);
    $("copy-curl").addEventListener("click", copyCurl);
    loadCatalog();
  }

  start();
})();
