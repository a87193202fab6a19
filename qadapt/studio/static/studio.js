// The studio's shared pieces: the JSON API, elements, the page router, timers and the line chart.
// Each page (runs.js, new_run.js, ...) registers itself with Studio.page({id, title, render}).
"use strict";

const Studio = (() => {
  const pages = [];
  let timers = [];

  async function api(path, body) {
    const options = body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
    const response = await fetch(path, options);
    const answer = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) throw new Error(answer.error || response.statusText);
    return answer;
  }

  // el("td", {class: "x", onclick: fn}, "text", child, ...)
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== undefined && child !== null) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function page(spec) { pages.push(spec); }

  // Repeats fn every ms while the page shown stays the same (the router clears them).
  function every(ms, fn) {
    fn();
    timers.push(setInterval(fn, ms));
  }

  function route() {
    timers.forEach(clearInterval);
    timers = [];
    const [id, ...rest] = (location.hash.slice(1) || pages[0].id).split("/");
    const shown = pages.find(p => p.id === id) || pages[0];
    document.getElementById("nav").replaceChildren(...pages.map(p =>
      el("a", {href: `#${p.id}`, class: p === shown ? "here" : null}, p.title)));
    const main = document.getElementById("main");
    main.replaceChildren();
    shown.render(main, decodeURIComponent(rest.join("/")));
  }

  function start() {
    window.addEventListener("hashchange", route);
    route();
  }

  function seconds(s) {
    if (s === null || s === undefined) return "";
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  // A markdown table (as `qadapt report` writes it) as an HTML table.
  function markdownTable(text) {
    const lines = text.trim().split("\n").filter(line => line.startsWith("|"));
    if (lines.length < 2) return el("p", {class: "muted"}, text);
    const cells = line => line.slice(1, -1).split(/(?<!\\)\|/).map(cell => cell.trim().replace(/\\\|/g, "|"));
    return el("table", {},
      el("thead", {}, el("tr", {}, cells(lines[0]).map(cell => el("th", {}, cell)))),
      el("tbody", {}, lines.slice(2).map(line => el("tr", {}, cells(line).map(cell => el("td", {}, cell))))));
  }

  const COLOURS = ["#2f6fdf", "#e04f16", "#079455", "#7a5af8", "#dd2590", "#0e9384", "#ca8504", "#475467"];

  // A line chart: series [{name, points: [[x, y], ...], dashed, colour (an index)}], as an SVG of width x height.
  // data-last-x holds the largest x drawn (the browser tests read it).
  function chart(title, series, width = 440, height = 220) {
    const svgNS = "http://www.w3.org/2000/svg";
    const make = (tag, attrs, text) => {
      const node = document.createElementNS(svgNS, tag);
      for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
      if (text !== undefined) node.textContent = text;
      return node;
    };
    const points = series.flatMap(s => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const svg = make("svg", {class: "chart", width, height, viewBox: `0 0 ${width} ${height}`,
                             "data-title": title, "data-last-x": points.length ? Math.max(...points.map(p => p[0])) : ""});
    svg.append(make("text", {x: 10, y: 16, class: "title"}, title));
    if (!points.length) {
      svg.append(make("text", {x: 10, y: 40}, "no points yet"));
      return svg;
    }
    const left = 52, right = 12, top = 26, bottom = 34;
    let [x0, x1] = [Math.min(...points.map(p => p[0])), Math.max(...points.map(p => p[0]))];
    let [y0, y1] = [Math.min(...points.map(p => p[1])), Math.max(...points.map(p => p[1]))];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const px = x => left + (x - x0) / (x1 - x0) * (width - left - right);
    const py = y => height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom);
    svg.append(make("line", {x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#d0d5dd"}));
    svg.append(make("line", {x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#d0d5dd"}));
    for (let i = 0; i <= 3; i++) {
      const y = y0 + (y1 - y0) * i / 3, x = x0 + (x1 - x0) * i / 3;
      svg.append(make("text", {x: left - 4, y: py(y) + 4, "text-anchor": "end"}, tick(y)));
      svg.append(make("text", {x: px(x), y: height - bottom + 14, "text-anchor": "middle"}, tick(x)));
    }
    svg.append(make("text", {x: width - right, y: height - 6, "text-anchor": "end"}, "step"));
    series.forEach((s, i) => {
      const drawn = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
      if (!drawn.length) return;
      const colour = COLOURS[(s.colour ?? i) % COLOURS.length];
      svg.append(make("polyline", {fill: "none", stroke: colour, "stroke-width": 1.6,
                                   "stroke-dasharray": s.dashed ? "4 3" : "none",
                                   points: drawn.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ")}));
      if (drawn.length === 1) svg.append(make("circle", {cx: px(drawn[0][0]), cy: py(drawn[0][1]), r: 2.5, fill: colour}));
      svg.append(make("text", {x: width - right, y: top + 12 * i, "text-anchor": "end", style: `fill: ${colour}`}, s.name));
    });
    return svg;
  }

  function tick(value) {
    const size = Math.abs(value);
    if (size !== 0 && (size < 1e-3 || size >= 1e5)) return value.toExponential(1);
    return Number(value.toPrecision(3)).toString();
  }

  // A select of the finished runs (those with an adapter to use), or a line saying there is none yet.
  async function finishedRuns(id, keep) {
    const runs = (await api("/api/runs")).filter(run => run.state === "finished");
    if (!runs.length) return el("p", {class: "muted"}, "No finished run yet.");
    return el("select", {id}, runs.map(run => el("option", {value: run.name, selected: run.name === keep}, run.name)));
  }

  // The jobs (evaluations, exports) of kind `kind` for the run `runOf()` names, with their logs, kept fresh.
  function jobsPanel(kind, runOf) {
    const panel = el("div", {class: "jobs"});
    every(2000, async () => {
      const run = runOf();
      if (!run) return;
      const jobs = (await api(`/api/jobs?run=${encodeURIComponent(run)}`)).filter(job => job.kind === kind);
      panel.replaceChildren(...jobs.map(job => el("div", {class: "panel job", "data-job": job.id, "data-state": job.state},
        el("strong", {}, `${job.id}: ${job.state}`), el("pre", {class: "console"}, job.log))));
    });
    return panel;
  }

  return {api, el, page, every, start, seconds, markdownTable, chart, finishedRuns, jobsPanel};
})();

document.addEventListener("DOMContentLoaded", Studio.start);
