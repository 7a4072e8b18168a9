// The lungscreen viewer: send one image to POST /predict, show the answer. Text goes in with
// textContent only (never as HTML), and nothing is loaded from anywhere but this server.
"use strict";

let token = new URLSearchParams(location.hash.slice(1)).get("token") || "";

function auth() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function $(id) {
  return document.getElementById(id);
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const response = await fetch("/model", { headers: auth() });
  if (response.status === 401) {
    $("token-box").hidden = false;
    $("model").textContent = "this server needs an access token";
    return;
  }
  const model = await response.json();
  $("token-box").hidden = true;
  const training = model.training || {};
  const parts = [`${model.name}${model.run ? ` (${model.run})` : ""}`, model.modality];
  if (model.task) parts.push(`task ${model.task}`);
  parts.push(`${model.input.size} px, pipeline ${model.input.pipeline}`);
  if (training.patients) parts.push(`trained on ${training.patients} patients`);
  $("model").textContent = parts.join(" · ");
  $("disclaimer").textContent = model.disclaimer;
}

function showAnswer(answer) {
  $("original").src = answer.pictures.original;
  $("overlay").src = answer.pictures.overlay;
  $("prediction").textContent = `Prediction: ${answer.prediction}`;
  const body = $("probabilities").querySelector("tbody");
  body.replaceChildren();
  const point = answer.operating_point;
  for (const [name, probability] of Object.entries(answer.probabilities)) {
    const row = document.createElement("tr");
    row.className = name === answer.prediction ? "chosen" : "";
    const label = document.createElement("td");
    label.textContent = name;
    const value = document.createElement("td");
    value.textContent = probability.toFixed(3);
    const barCell = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * probability).toFixed(1)}%`;
    bar.appendChild(fill);
    if (point && point.positive_class === name) {
      const mark = document.createElement("i");
      mark.style.left = `${(100 * point.threshold).toFixed(1)}%`;
      mark.title = `operating point ${point.threshold.toFixed(3)}`;
      bar.appendChild(mark);
    }
    barCell.appendChild(bar);
    row.append(label, value, barCell);
    body.appendChild(row);
  }
  $("operating-point").textContent = point
    ? `Operating point: ${point.positive_class} from probability ${point.threshold.toFixed(3)} (${point.rule}, chosen on ${point.chosen_on}); red mark.`
    : "No operating point stored: the most probable class is shown.";
  const notes = $("notes");
  notes.replaceChildren();
  const items = [...answer.notes];
  if (answer.ood) items.push(`This image is unlike the training images (score ${answer.ood_score}): the answer may mean little.`);
  if (answer.screened === false) items.push("The findings head called it negative: no boxes or mask were computed.");
  if (answer.boxes) items.push(`${answer.boxes.length} box(es) found (yellow).`);
  for (const text of items) {
    const item = document.createElement("li");
    item.textContent = text;
    notes.appendChild(item);
  }
  $("result").hidden = false;
}

async function send(file) {
  if (!file) return;
  status(`screening ${file.name}…`, false);
  const form = new FormData();
  form.append("file", file);
  try {
    const response = await fetch("/predict", { method: "POST", body: form, headers: auth() });
    const answer = await response.json();
    if (!response.ok) {
      status(`${response.status}: ${answer.detail}`, true);
      if (response.status === 401) $("token-box").hidden = false;
      return;
    }
    showAnswer(answer);
    status(`${file.name}: done`, false);
  } catch (error) {
    status(`the server did not answer: ${error}`, true);
  }
}

function setUp() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    send(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (event) => send(event.target.files[0]));
  $("token-save").addEventListener("click", () => { token = $("token").value; loadModel(); });
  loadModel().catch((error) => status(`cannot reach the server: ${error}`, true));
}

document.addEventListener("DOMContentLoaded", setUp);
