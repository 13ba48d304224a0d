"""The playground page served at `/`: one self-contained HTML file (no build step, no external assets).

A prompt box, a threshold slider (the request's `exit_threshold`), and the streamed completion, each piece of
text shaded by the loop step at which its token exited (the `exit_steps` the server adds to every chunk):
light for an early exit, dark for the full depth, so a reader sees where the model thinks harder.
"""

PLAYGROUND_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>looplm playground</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
  textarea { width: 100%; height: 6rem; font: inherit; }
  .row { display: flex; gap: 1rem; align-items: center; margin: .5rem 0; flex-wrap: wrap; }
  #output { white-space: pre-wrap; border: 1px solid #ccc; padding: .75rem; min-height: 4rem; line-height: 1.6; }
  .tok { border-radius: 3px; }
  #legend span { padding: 0 .4rem; border-radius: 3px; }
  #status { color: #666; }
</style>
</head>
<body>
<h1>looplm playground</h1>
<p>Each token is shaded by the recurrent step at which it exited: light = early, dark = the full depth.</p>
<textarea id="prompt" placeholder="Type a prompt">Once upon a time</textarea>
<div class="row">
  <label>exit threshold <input id="threshold" type="range" min="0" max="1" step="0.05" value="0.5">
    <output id="threshold-value">0.5</output></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" value="64" style="width:5rem"></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0" style="width:4rem">
  </label>
  <label>API key <input id="api-key" type="password" style="width:8rem"></label>
  <button id="run">Generate</button>
</div>
<div id="legend"></div>
<div id="output"></div>
<p id="status"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, maxSteps = 4;
$("threshold").oninput = () => { $("threshold-value").textContent = $("threshold").value; };

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("api-key").value) h["Authorization"] = "Bearer " + $("api-key").value;
  return h;
}
function shade(step) {  // step 1 -> light, maxSteps -> dark
  const level = maxSteps > 1 ? (step - 1) / (maxSteps - 1) : 1;
  return "hsl(210, 80%, " + Math.round(92 - 50 * level) + "%)";
}
function legend() {
  $("legend").innerHTML = "";
  for (let s = 1; s <= maxSteps; s++) {
    const span = document.createElement("span");
    span.textContent = "step " + s;
    span.style.background = shade(s);
    if (s > maxSteps / 2) span.style.color = "white";
    $("legend").appendChild(span);
  }
}
async function loadModel() {
  const r = await fetch("v1/models", {headers: headers()});
  if (!r.ok) { $("status").textContent = "models: HTTP " + r.status; return; }
  model = (await r.json()).data[0].id;
  const s = await fetch("v1/engine/stats", {headers: headers()});
  if (s.ok) maxSteps = (await s.json()).max_loop_steps || maxSteps;
  legend();
  $("status").textContent = "model " + model;
}
async function run() {
  if (!model) await loadModel();
  const out = $("output");
  out.innerHTML = "";
  $("status").textContent = "generating...";
  const body = {model, prompt: $("prompt").value, stream: true, max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value), exit_threshold: Number($("threshold").value),
    stream_options: {include_usage: true}};
  const response = await fetch("v1/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!response.ok) {
    const err = await response.json().catch(() => ({}));
    $("status").textContent = "HTTP " + response.status + ": " + ((err.error || {}).message || "");
    return;
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", pending = [], lastStep = maxSteps;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (line === "[DONE]") continue;
      const chunk = JSON.parse(line);
      if (chunk.usage && chunk.choices.length === 0) {
        $("status").textContent = chunk.usage.completion_tokens + " tokens, " +
          chunk.usage.average_recurrent_steps + " recurrent steps per token on average";
        continue;
      }
      const choice = chunk.choices[0];
      pending = pending.concat(choice.exit_steps || []);
      if (!choice.text) continue;  // text held back (a possible stop string) comes with a later chunk
      const step = pending.length ? Math.round(pending.reduce((a, b) => a + b, 0) / pending.length) : lastStep;
      pending = [];
      lastStep = step;
      const span = document.createElement("span");
      span.className = "tok";
      span.dataset.step = String(step);
      span.title = "exited at step " + step;
      span.style.background = shade(step);
      span.textContent = choice.text;
      out.appendChild(span);
    }
  }
}
$("run").onclick = () => run().catch((e) => { $("status").textContent = String(e); });
loadModel().catch((e) => { $("status").textContent = String(e); });
</script>
</body>
</html>
"""
