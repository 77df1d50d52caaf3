// The captions page: choose or drop a photo, POST it to v1/captions, show the caption word by word;
// hovering or tapping a word lays that word's attention map over the photo. No libraries, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;      // GET v1/model
let result = null;     // the current image's entry of "results"
let pinned = -1;       // word index fixed by a tap or click (-1: none)

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function showWord(i) {
  const overlay = $("overlay");
  const words = document.querySelectorAll(".word");
  words.forEach((w, j) => w.classList.toggle("active", j === i));
  const att = result && result.attention;
  if (i < 0 || !att) {
    overlay.hidden = true;
    overlay.removeAttribute("src");
    return;
  }
  overlay.src = att.words[i].overlay;
  overlay.alt = `attention of "${att.words[i].word}"`;
  overlay.hidden = false;
}

function wordButton(word, i) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "word";
  b.textContent = word;
  b.addEventListener("mouseenter", () => showWord(i));
  b.addEventListener("focus", () => showWord(i));
  b.addEventListener("mouseleave", () => showWord(pinned));
  b.addEventListener("blur", () => showWord(pinned));
  b.addEventListener("click", () => { pinned = pinned === i ? -1 : i; showWord(pinned); });
  return b;
}

function render(res, file) {
  result = res;
  pinned = -1;
  const att = res.attention;
  $("photo").src = att ? att.image : URL.createObjectURL(file);
  const caption = $("caption");
  caption.replaceChildren(...res.words.map(wordButton));
  $("hint").textContent = att ? "Hover over or tap a word to see where the model looked for it."
                              : "This model has no attention maps (it captions from the pooled feature).";
  $("score").textContent = `log-probability ${res.score.toFixed(2)} · beam ${model ? model.limits.beam_size : "?"}`;
  $("result").hidden = false;
  showWord(-1);
}

async function caption(file) {
  if (!file) return;
  if (model && file.size > model.limits.max_upload_bytes) {
    setStatus(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB; this server takes at most ` +
              `${(model.limits.max_upload_bytes / 1e6).toFixed(1)} MB.`, true);
    return;
  }
  setStatus(`captioning ${file.name}…`);
  const body = new FormData();
  body.append("image", file, file.name);
  const attention = model ? model.has_attention : true;
  try {
    const resp = await fetch(`v1/captions?attention=${attention}`, { method: "POST", body });
    const data = await resp.json().catch(() => ({ detail: `HTTP ${resp.status}` }));
    if (!resp.ok) {
      setStatus(`${file.name}: ${data.detail} (HTTP ${resp.status})`, true);
      return;
    }
    render(data.results[0], file);
    setStatus("");
  } catch (err) {
    setStatus(`the server could not be reached (${err.message})`, true);
  }
}

async function loadModel() {
  try {
    const resp = await fetch("v1/model");
    model = await resp.json();
    const best = model.best_val || {};
    const cider = typeof best.CIDEr === "number" ? ` · best val CIDEr ${best.CIDEr.toFixed(3)}` : "";
    $("model").textContent = `${model.decoder} decoder on ${model.backbone} (${model.image_size} px), ` +
                             `${model.vocab_size} words${cider}`;
  } catch (err) {
    $("model").textContent = "model description unavailable";
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = "";  // choosing the same file again fires "change" again
    caption(file);
  });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    caption(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  loadModel();
}

setUp();
