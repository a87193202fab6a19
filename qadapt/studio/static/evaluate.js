// The evaluate page: a finished run scored on chosen sets by a `qadapt eval` job; its scores with their
// number of problems and 95% intervals.
"use strict";

(() => {
  const {api, el} = Studio;

  async function render(main, named) {
    const notice = el("p", {class: "error"});
    const choose = await Studio.finishedRuns("eval-run", named);
    if (choose.tagName !== "SELECT") { main.append(choose); return; }
    const sets = el("div", {id: "sets"}), other = el("input", {id: "other-set", size: 48,
      placeholder: "another set: a path, PATH@N or a hub id"});
    const limit = el("input", {id: "limit", size: 6, placeholder: "all"});
    const go = el("button", {id: "evaluate", class: "primary"}, "Evaluate");
    const scores = el("div", {id: "scores"});
    main.append(el("p", {}, el("label", {}, "Run ", choose)), sets, el("p", {}, other),
                el("p", {}, el("label", {}, "First N problems of each set ", limit), " ", go), notice,
                el("h3", {}, "Scores"), scores, Studio.jobsPanel("eval", () => choose.value));

    async function load() {
      const offered = (await api(`/api/runs/${encodeURIComponent(choose.value)}/sets`)).sets;
      sets.replaceChildren(...offered.map(set => el("label", {class: "set"},
        el("input", {type: "checkbox", value: set}), ` ${set} `)));
    }

    async function showScores() {
      const run = (await api("/api/runs")).find(r => r.name === choose.value);
      const rows = Object.entries((run && run.scores) || {});
      const percent = value => (100 * value).toFixed(1);
      scores.replaceChildren(rows.length ? el("table", {}, el("thead", {}, el("tr", {},
        ["set", "accuracy %", "95% interval", "correct", "problems"].map(h => el("th", {}, h)))),
        el("tbody", {}, rows.map(([set, s]) => el("tr", {"data-set": set}, el("td", {}, set),
          el("td", {}, s.total ? percent(s.accuracy) : `F1 ${s.f1}`),
          el("td", {}, s.interval ? `${percent(s.interval[0])}–${percent(s.interval[1])}` : ""),
          el("td", {}, s.correct ?? ""), el("td", {}, s.total ?? "")))))
        : el("p", {class: "muted"}, "Not scored yet."));
    }

    go.addEventListener("click", async () => {
      notice.textContent = "";
      const chosen = [...sets.querySelectorAll("input:checked")].map(box => box.value);
      if (other.value.trim()) chosen.push(other.value.trim());
      const body = {sets: chosen};
      if (limit.value.trim()) body.limit = Number(limit.value);
      try { await api(`/api/runs/${encodeURIComponent(choose.value)}/eval`, body); }
      catch (error) { notice.textContent = error.message; }
    });
    choose.addEventListener("change", () => { load(); showScores(); });
    await load();
    Studio.every(3000, showScores);
  }

  Studio.page({id: "evaluate", title: "Evaluate", render});
})();
