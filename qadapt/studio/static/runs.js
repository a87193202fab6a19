// The runs page: the runs table, live charts of the runs selected (metrics.jsonl as it grows), their
// `qadapt report` table, the console of the first one, stop and resume.
"use strict";

(() => {
  const {api, el, chart, seconds, markdownTable} = Studio;
  // Charts after the loss, in this order, then any other number a task logs (one chart per key).
  const FIRST = ["reward", "margin", "reward_accuracy", "lr", "grad_norm", "tokens_per_s"];
  const NOT_CHARTED = new Set(["step", "loss", "eval_loss", "elapsed_s", "tokens"]);

  function render(main, named) {
    const selected = new Set(named ? [named] : []);
    const logs = new Map();  // run name -> {rows, next}
    let runs = [], reportKey = "";
    const table = el("div"), actions = el("div"), charts = el("div", {class: "charts"});
    const report = el("div", {class: "panel"}, el("p", {class: "muted"}, "Select finished runs to compare them."));
    const consoleBox = el("pre", {class: "console"});
    const notice = el("p", {class: "error"});
    main.append(table, notice, actions, charts, el("h3", {}, "Report"), report, el("h3", {}, "Console"), consoleBox);

    let busy = false;
    async function refresh() {
      if (busy) return;  // the last refresh is still waiting for the studio
      busy = true;
      try {
        runs = await api("/api/runs");
        if (!selected.size && runs.length) selected.add((runs.find(r => r.state === "training") || runs[0]).name);
        // A run just started is listed once its process has written its recipe.
        for (const name of selected) if (runs.some(r => r.name === name)) await follow(name);
        notice.textContent = "";
        draw();
        await showReport();
        await showConsole();
      } catch (error) {
        notice.textContent = error.message;
      } finally {
        busy = false;
      }
    }

    async function follow(name) {
      const log = logs.get(name) || {rows: [], next: 0};
      const answer = await api(`/api/runs/${encodeURIComponent(name)}/metrics?after=${log.next}`);
      log.rows.push(...answer.rows);
      log.next = answer.next;
      logs.set(name, log);
    }

    function draw() {
      table.replaceChildren(runsTable());
      actions.replaceChildren(...runs.filter(r => selected.has(r.name)).flatMap(buttons));
      const shown = [...selected].filter(name => logs.has(name));
      const keys = new Set();
      shown.forEach(name => logs.get(name).rows.forEach(row => Object.keys(row).forEach(key => {
        if (!NOT_CHARTED.has(key) && typeof row[key] === "number") keys.add(key);
      })));
      const ordered = [...FIRST.filter(key => keys.has(key)), ...[...keys].filter(key => !FIRST.includes(key)).sort()];
      // One colour per run on every chart; the held-out loss dashed in its run's colour.
      const series = key => shown.map((name, colour) => ({
        name: shown.length > 1 ? `${name} ${key}` : key, colour,
        points: logs.get(name).rows.filter(row => typeof row[key] === "number").map(row => [row.step, row[key]])}));
      const loss = shown.flatMap((name, colour) => [
        {name: shown.length > 1 ? `${name} loss` : "loss", colour,
         points: logs.get(name).rows.filter(row => "loss" in row).map(row => [row.step, row.loss])},
        {name: shown.length > 1 ? `${name} held-out` : "held-out loss", dashed: true, colour,
         points: logs.get(name).rows.filter(row => "eval_loss" in row).map(row => [row.step, row.eval_loss])}]);
      charts.replaceChildren(chart("loss", loss), ...ordered.map(key => chart(key, series(key))));
    }

    function runsTable() {
      if (!runs.length) return el("p", {class: "muted"}, "No runs yet: start one on the New run page.");
      const head = ["", "run", "state", "task", "adapter", "step", "time", "ETA", "scores"];
      return el("table", {id: "runs"}, el("thead", {}, el("tr", {}, head.map(h => el("th", {}, h)))),
        el("tbody", {}, runs.map(run => el("tr", {"data-run": run.name},
          el("td", {}, el("input", {type: "checkbox", checked: selected.has(run.name), onchange: event => {
            event.target.checked ? selected.add(run.name) : selected.delete(run.name);
            refresh();
          }})),
          el("td", {}, run.name),
          el("td", {}, el("span", {class: `state state-${run.state}`, title: run.message || ""}, run.state)),
          el("td", {}, run.task || run.problem || ""),
          el("td", {}, run.kind ? `${run.kind} on ${run.model} (${run.quant})` : ""),
          el("td", {class: "step"}, run.max_steps ? `${run.step} / ${run.max_steps}` : run.step),
          el("td", {}, seconds(run.wall_s ?? run.elapsed_s)),
          el("td", {}, seconds(run.eta_s)),
          el("td", {}, scores(run.scores))))));
    }

    function scores(sets) {
      if (!sets) return "";
      const percent = value => (100 * value).toFixed(1);
      return Object.entries(sets).map(([name, s]) => s.total
        ? `${name} ${percent(s.accuracy)}% of ${s.total} (${percent(s.interval[0])}–${percent(s.interval[1])})`
        : `${name} F1 ${s.f1 ?? ""}`).join("; ");
    }

    function buttons(run) {
      const post = async (what) => {
        notice.textContent = "";
        try {
          await api(`/api/runs/${encodeURIComponent(run.name)}/${what}`, {});
          setTimeout(refresh, 500);
        } catch (error) {
          notice.textContent = error.message;
        }
      };
      const found = [];
      if (run.state === "training") found.push(el("button", {id: "stop", onclick: () => post("stop")}, `Stop ${run.name}`));
      if (run.state === "interrupted" || run.state === "failed") {
        found.push(el("button", {id: "resume", onclick: () => post("resume")}, `Resume ${run.name}`));
      }
      if (run.state === "finished") {
        found.push(...["evaluate", "export"].map(page =>
          el("a", {href: `#${page}/${encodeURIComponent(run.name)}`, class: "action"}, `${page} ${run.name}`)));
      }
      if (run.message) found.push(el("span", {class: "muted"}, ` ${run.message} `));
      return found;
    }

    async function showReport() {
      const finished = runs.filter(r => selected.has(r.name) && r.state === "finished").map(r => r.name).sort();
      const key = finished.join("\n");
      if (key === reportKey) return;
      reportKey = key;
      if (!finished.length) {
        report.replaceChildren(el("p", {class: "muted"}, "Select finished runs to compare them."));
        return;
      }
      const answer = await api("/api/report?" + finished.map(name => `run=${encodeURIComponent(name)}`).join("&"));
      report.replaceChildren(markdownTable(answer.table), answer.paired ? markdownTable(answer.paired) : "");
    }

    async function showConsole() {
      const first = [...selected][0];
      if (!first) return;
      const answer = await api(`/api/runs/${encodeURIComponent(first)}/console`);
      const atEnd = consoleBox.scrollTop + consoleBox.clientHeight >= consoleBox.scrollHeight - 4;
      consoleBox.textContent = answer.text || "(this run was not started from the studio: no console)";
      if (atEnd) consoleBox.scrollTop = consoleBox.scrollHeight;
    }

    Studio.every(2000, refresh);
  }

  Studio.page({id: "runs", title: "Runs", render});
})();
