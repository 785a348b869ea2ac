// The page: upload -> reconstruct (or tokenize) -> caption; ask; draw. Plain JS, no libraries (works offline).
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;
let currentIds = null;

async function api(path, options) {
  const response = await fetch("/api/" + path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || `${path}: HTTP ${response.status}`);
  return body;
}

function able(name) { return info && info.abilities[name].available; }

function showIds(element, ids) {
  element.replaceChildren(...ids.map((id, i) => {
    const cell = document.createElement("span");
    const hue = Math.round(360 * id / (info ? info.codebook_size : 1024));
    cell.style.background = `hsl(${hue}, 55%, 42%)`;
    cell.textContent = id;
    cell.title = `position ${i}: id ${id}`;
    return cell;
  }));
  element.dataset.count = ids.length;
}

function setError(message) { $("error").textContent = message || ""; }

async function busy(element, work) {
  element.classList.add("busy");
  setError("");
  try { await work(); } catch (e) { setError(e.message); } finally { element.classList.remove("busy"); }
}

async function loadInfo() {
  info = await api("info");
  $("models").textContent = `tokenizer ${info.model}: ${info.num_tokens} ids per image from ` +
    `${info.codebook_size} codes` + (info.lm ? `; language model ${info.lm}` : "");
  const byReason = new Map();  // one line per missing part, naming the abilities it stops
  for (const [name, a] of Object.entries(info.abilities)) {
    if (!a.available) byReason.set(a.reason, [...(byReason.get(a.reason) || []), name]);
  }
  const lines = [...byReason].map(([reason, names]) => `${names.join(", ")} unavailable: ${reason}`);
  if (able("draw") && !info.draw_images) lines.push("draw gives ids only: no image decoder");
  $("status").replaceChildren(...lines.map((text) => Object.assign(document.createElement("li"), {textContent: text})));
  $("draw").disabled = !able("draw");
}

async function onFile() {
  const file = $("file").files[0];
  if (!file) return;
  $("original").src = URL.createObjectURL(file);
  for (const id of ["recon"]) $(id).removeAttribute("src");
  $("caption").textContent = "";
  $("answer").textContent = "";
  await busy($("see"), async () => {
    const form = new FormData();
    form.append("image", file);
    const result = await api(able("reconstruct") ? "reconstruct" : "tokenize", {method: "POST", body: form});
    currentIds = result.ids;
    showIds($("ids"), result.ids);
    if (result.image) $("recon").src = result.image;
    $("ask").disabled = !able("ask");
    if (able("caption")) {
      const form2 = new FormData();
      form2.append("ids", currentIds.join(","));
      $("caption").textContent = (await api("caption", {method: "POST", body: form2})).caption || "(empty)";
    } else {
      $("caption").textContent = "(" + info.abilities.caption.reason + ")";
    }
  });
}

async function onAsk(event) {
  event.preventDefault();
  if (!currentIds) return setError("choose an image first");
  await busy($("see"), async () => {
    const form = new FormData();
    form.append("ids", currentIds.join(","));
    form.append("question", $("question").value);
    $("answer").textContent = (await api("ask", {method: "POST", body: form})).answer || "(empty)";
  });
}

async function onDraw(event) {
  event.preventDefault();
  await busy($("draw-section"), async () => {
    const body = JSON.stringify({prompt: $("prompt").value, seed: Number($("seed").value || 0)});
    const result = await api("draw", {method: "POST", headers: {"content-type": "application/json"}, body});
    showIds($("drawn-ids"), result.ids);
    if (result.image) { $("drawn").src = result.image; $("drawn-note").textContent = result.prompt; }
    else { $("drawn").removeAttribute("src"); $("drawn-note").textContent = "no image decoder: ids only"; }
  });
}

$("file").addEventListener("change", onFile);
$("ask-form").addEventListener("submit", onAsk);
$("draw-form").addEventListener("submit", onDraw);
loadInfo().catch((e) => setError(e.message));
