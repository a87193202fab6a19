// The export page: a finished run merged or exported (PEFT, GGUF, llama.cpp LoRA, Ollama) by a job whose
// log shows its progress and the figures the exporter verifies.
"use strict";

(() => {
  const {api, el} = Studio;

  async function render(main, named) {
    const choose = await Studio.finishedRuns("export-run", named);
    if (choose.tagName !== "SELECT") { main.append(choose); return; }
    const choices = await api("/api/export-formats");
    const format = el("select", {id: "format"}, choices.formats.map(f => el("option", {value: f}, f)));
    const type = el("select", {id: "gguf-type"}, choices.gguf_types.map(t => el("option", {value: t}, t)));
    const go = el("button", {id: "export", class: "primary"}, "Export");
    const notice = el("p", {class: "error"});
    main.append(el("p", {}, el("label", {}, "Run ", choose), " ", el("label", {}, "Format ", format), " ",
                   el("label", {}, "GGUF type ", type), " ", go),
                el("p", {class: "muted"}, "Written into the run's exports/ folder; an export that exists is not overwritten."),
                notice, Studio.jobsPanel("export", () => choose.value));
    const showType = () => { type.disabled = !["gguf", "gguf-lora", "ollama"].includes(format.value); };
    format.addEventListener("change", showType);
    showType();
    go.addEventListener("click", async () => {
      notice.textContent = "";
      try { await api(`/api/runs/${encodeURIComponent(choose.value)}/export`, {format: format.value, type: type.value}); }
      catch (error) { notice.textContent = error.message; }
    });
  }

  Studio.page({id: "export", title: "Export", render});
})();
