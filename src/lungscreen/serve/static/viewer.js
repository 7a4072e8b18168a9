// The lungscreen viewer: send one image to POST /predict, show the answer. Text goes in with
// textContent only (never as HTML), and nothing is loaded from anywhere but this server.
//
// A person reading this page must never see an answer beside the wrong file: every upload first clears the
// previous answer, an error takes the answer's place (naming the file and the reason), and a reply that
// arrives after a newer upload started is dropped.
"use strict";

let token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
let latest = 0; // the number of the upload whose answer may be shown

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

function interval(figure) {
  if (typeof figure.low !== "number" || typeof figure.high !== "number") return "no interval";
  return `[${figure.low.toFixed(2)}, ${figure.high.toFixed(2)}]`;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  return tr;
}

// The run's own test figures, as training stored them with its weights.
function showTestFigures(model) {
  const test = model.test;
  const body = $("test-figures").querySelector("tbody");
  body.replaceChildren();
  $("about").hidden = false;
  if (!test || !test.figures) {
    $("test-summary").textContent = "No test figures are stored with this model (trained without a test split, " +
      "or an exported ONNX file): nothing says how often it is right.";
    $("test-figures").hidden = true;
    return;
  }
  const counts = Object.entries(test.counts || {}).map(([name, count]) => `${name} ${count}`).join(", ");
  $("test-summary").textContent = `On its ${test.split || "test"} split, held out from training: ${test.images} ` +
    `images of ${test.patients} patients${counts ? ` (${counts})` : ""}. Figures at the model's own decision rule.`;
  const point = model.operating_point;
  const classes = point ? [point.positive_class] : model.classes;
  const names = [];
  for (const name of classes) names.push(`sensitivity/${name}`, `specificity/${name}`);
  names.push("balanced_accuracy");
  for (const name of names) {
    const figure = test.figures[name];
    if (!figure || typeof figure.value !== "number") continue;
    body.appendChild(row([name.replace("/", " for ").replace("_", " "), figure.value.toFixed(2), interval(figure)]));
  }
  $("test-figures").hidden = body.children.length === 0;
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
  if (model.lungs === "classical") parts.push("lungs: classical fallback");
  $("model").textContent = parts.join(" · ");
  $("disclaimer").textContent = model.disclaimer;
  showTestFigures(model);
}

// Remove every trace of the previous answer (and of a previous error).
function clearAnswer() {
  $("result").hidden = true;
  $("error").hidden = true;
  for (const id of ["original", "overlay"]) $(id).removeAttribute("src");
  for (const id of ["result-file", "prediction", "decision", "operating-point", "error-title", "error-reason",
                    "study-uid", "series-uid", "sop-uid"]) {
    $(id).textContent = "";
  }
  $("probabilities").querySelector("tbody").replaceChildren();
  $("notes").replaceChildren();
  $("identity").hidden = true;
}

function showError(name, reason) {
  clearAnswer();
  $("error-title").textContent = `${name}: not screened`;
  $("error-reason").textContent = reason;
  $("error").hidden = false;
  status(`${name}: not screened - ${reason}`, true);
}

function showAnswer(answer, name) {
  $("result-file").textContent = `Answer for ${name}`;
  $("original").src = answer.pictures.original;
  $("overlay").src = answer.pictures.overlay;
  const point = answer.operating_point;
  const flagged = point && answer.prediction === point.positive_class;
  $("prediction").textContent = flagged ? `${answer.prediction} flagged` : `Answer: ${answer.prediction}`;
  $("decision").textContent = answer.decision;
  const body = $("probabilities").querySelector("tbody");
  for (const [klass, probability] of Object.entries(answer.probabilities)) {
    const tr = row([klass, probability.toFixed(3)]);
    tr.className = klass === answer.prediction ? "chosen" : "";
    const barCell = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * probability).toFixed(1)}%`;
    bar.appendChild(fill);
    if (point && point.positive_class === klass) {
      const mark = document.createElement("i");
      mark.style.left = `${(100 * point.threshold).toFixed(1)}%`;
      mark.title = `threshold ${point.threshold.toFixed(3)}`;
      bar.appendChild(mark);
    }
    barCell.appendChild(bar);
    tr.appendChild(barCell);
    body.appendChild(tr);
  }
  $("operating-point").textContent = point
    ? `Red mark: the threshold on ${point.positive_class} (${point.threshold.toFixed(3)}, ${point.rule}, chosen on the ${point.chosen_on}).`
    : "";
  const image = answer.image || {};
  if (image.format === "DICOM") {
    $("study-uid").textContent = image.study_instance_uid || "not given";
    $("series-uid").textContent = image.series_instance_uid || "not given";
    $("sop-uid").textContent = image.sop_instance_uid || "not given";
    $("identity").hidden = false;
  }
  const items = [...answer.notes];
  const lungs = answer.lungs || {};
  if (lungs.method === "classical" && lungs.found) {
    items.push("The lungs were outlined by the classical fallback (no trained lung model is installed): a rough " +
      "outline, not a segmentation to rely on.");
  }
  let caption = "heat-map of the decided class, lungs in green";
  if (answer.seen) {
    caption += "; the model saw only the lung crop (dashed frame)";
    items.push("The model saw only the lung crop (dashed frame on the heat-map), not the whole image; the heat-map is " +
      "zero outside it.");
  }
  $("overlay-caption").textContent = caption;
  if (answer.ood) items.push(`This image is unlike the training images (score ${answer.ood_score}): the answer may mean little.`);
  if (answer.screened === false) items.push("The findings head called it negative: no boxes or mask were computed.");
  if (answer.boxes) items.push(`${answer.boxes.length} box(es) found (yellow).`);
  for (const text of items) {
    const item = document.createElement("li");
    item.textContent = text;
    $("notes").appendChild(item);
  }
  $("result").hidden = false;
}

async function reason(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `the server answered ${response.status} ${response.statusText}`;
  }
}

async function send(file) {
  if (!file) return;
  const ticket = ++latest;
  clearAnswer();
  status(`screening ${file.name}…`, false);
  const form = new FormData();
  form.append("file", file);
  let response;
  try {
    response = await fetch("/predict", { method: "POST", body: form, headers: auth() });
  } catch (error) {
    if (ticket === latest) showError(file.name, `the server did not answer (${error})`);
    return;
  }
  if (!response.ok) {
    const why = await reason(response);
    if (ticket !== latest) return;
    showError(file.name, `${why} (HTTP ${response.status})`);
    if (response.status === 401) $("token-box").hidden = false;
    return;
  }
  const answer = await response.json();
  if (ticket !== latest) return; // a newer upload owns the page now
  showAnswer(answer, file.name);
  status(`${file.name}: screened`, false);
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
  $("choose").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = ""; // choosing the same file again is a new upload too
    send(file);
  });
  $("token-save").addEventListener("click", () => { token = $("token").value; loadModel(); });
  loadModel().catch((error) => status(`cannot reach the server: ${error}`, true));
}

document.addEventListener("DOMContentLoaded", setUp);
