// The new-run page: a recipe, its keys in a form drawn from the recipe schema, each problem beside its
// key, `qadapt plan`'s memory estimate for a GPU size, and Start.
"use strict";

(() => {
  const {api, el} = Studio;
  const SECTIONS = ["", "model", "adapter", "data", "train", "eval", "grpo", "preference"];
  const GPU_SIZES = [8, 12, 16, 24, 40, 48, 80];

  // A value as YAML text, as it would be typed after `key=` on the command line.
  const yaml = value => value === null ? "null" : typeof value === "object" ? JSON.stringify(value) : String(value);

  async function render(main) {
    const notice = el("p", {class: "error"});
    const [recipes, schema] = await Promise.all([api("/api/recipes"), api("/api/schema")]);
    const choose = el("select", {id: "recipe"}, recipes.map(r => el("option", {value: r.id}, r.label)));
    const about = el("pre", {class: "muted"});
    const name = el("input", {id: "name", size: 32});
    const gpu = el("select", {id: "gpu"}, GPU_SIZES.map(size => el("option", {value: size, selected: size === 24},
                                                                    `${size} GiB`)));
    const startButton = el("button", {id: "start", class: "primary"}, "Start training");
    const problems = el("div", {id: "problems"}), plan = el("div", {id: "plan", class: "panel"}), form = el("form");
    main.append(el("p", {}, el("label", {}, "Recipe ", choose)), about,
                el("p", {}, el("label", {}, "Run name ", name), " ", startButton), notice, problems, plan, form);
    let initial = {}, inputs = new Map(), checking = null;

    let loads = 0;
    async function load() {
      const recipe = recipes.find(r => r.id === choose.value), ticket = ++loads;
      about.textContent = recipe.about;
      name.value = `${recipe.label.replace(/^run /, "").replace(/\.ya?ml$/, "").replace(/[^\w.-]+/g, "-")}-${stamp()}`;
      const values = (await api(`/api/recipe?id=${encodeURIComponent(recipe.id)}`)).values;
      if (ticket !== loads) return;  // another recipe was chosen meanwhile: its form, not this one, is drawn
      initial = values;
      drawForm();
      form.dataset.recipe = recipe.id;  // the form is this recipe's from here on
      check();
    }

    // The form for the recipe loaded, the adapter keys of its kind; `values`: keys already changed.
    function drawForm(values = {}) {
      const kind = values["adapter.kind"] ?? yaml(initial["adapter.kind"]);
      inputs = new Map();
      form.replaceChildren(...SECTIONS.map(section => el("fieldset", {}, el("legend", {}, section || "recipe"),
        schema.keys.filter(key => key.section === section && !(key.kinds && !key.kinds.includes(kind)))
          .map(keyRow))));
      for (const [key, value] of Object.entries(values)) {
        const input = inputs.get(key);
        if (!input) continue;
        input.value = value;
        input.closest(".key").classList.add("changed");
      }
    }

    function keyRow(key) {
      const locked = schema.locked.includes(key.key);
      const value = yaml(key.key in initial ? initial[key.key] : key.default);
      let input;
      if (key.type === "choice" || key.type === "bool") {
        const choices = (key.type === "bool" ? [true, false] : key.choices).map(yaml);
        if (key.nullable) choices.push("null");
        input = el("select", {}, choices.map(choice => el("option", {value: choice, selected: choice === value}, choice)));
      } else {
        input = el("input", {value, size: 24});
      }
      input.name = key.key;
      input.disabled = locked;
      input.dataset.initial = value;
      inputs.set(key.key, input);
      const row = el("div", {class: "key", "data-key": key.key},
        el("label", {}, key.key), input,
        el("div", {}, el("div", {class: "doc"}, key.doc + (locked ? " (set in the recipe file, not here)" : "")),
           el("div", {class: "problem"})));
      input.addEventListener(input.tagName === "SELECT" ? "change" : "input", () => {
        row.classList.toggle("changed", input.value !== input.dataset.initial);
        if (key.key === "adapter.kind") drawForm(overrides());
        clearTimeout(checking);
        checking = setTimeout(check, 400);
      });
      return row;
    }

    // The keys changed from the recipe file, as {key: YAML text}.
    function overrides() {
      const changed = {};
      for (const [key, input] of inputs) if (!input.disabled && input.value !== input.dataset.initial) changed[key] = input.value;
      return changed;
    }

    let checks = 0;
    async function check() {
      notice.textContent = "";
      const ticket = ++checks;
      const answer = await api("/api/check", {recipe: choose.value, overrides: overrides(), gpu_memory: Number(gpu.value)})
        .catch(error => ({problems: [{key: null, message: error.message}], plan: null}));
      if (ticket !== checks) return;  // a later check was sent: an earlier, slower answer must not overwrite it
      form.querySelectorAll(".problem").forEach(node => { node.textContent = ""; });
      const loose = [];
      for (const problem of answer.problems) {
        const box = form.querySelector(`.key[data-key="${problem.key}"] .problem`);
        box ? (box.textContent = problem.message) : loose.push(problem.message);
      }
      problems.replaceChildren(...loose.map(message => el("p", {class: "problem"}, message)));
      startButton.disabled = answer.problems.length > 0;
      showPlan(answer.plan);
    }

    function showPlan(figures) {
      if (!figures) { plan.replaceChildren(el("p", {class: "muted"}, "Mend the recipe to see its memory plan.")); return; }
      if (figures.error) { plan.replaceChildren(el("p", {class: "muted"}, `No memory plan: ${figures.error}`)); return; }
      plan.replaceChildren(
        el("p", {}, "Memory on one GPU (qadapt plan): ", el("strong", {}, `${figures.needed_gib.toFixed(2)} GiB`),
           " with the CUDA context and slack, on ", gpu, ": ",
           el("span", {class: figures.fits ? "fits" : "fits-not"}, figures.fits ? "fits" : "does not fit")),
        el("table", {}, el("tbody", {}, Object.entries(figures.parts_gib).map(([part, gib]) =>
          el("tr", {}, el("td", {}, part), el("td", {}, `${gib.toFixed(3)} GiB`))))));
    }

    startButton.addEventListener("click", async () => {
      notice.textContent = "";
      startButton.disabled = true;
      try {
        const answer = await api("/api/start", {recipe: choose.value, name: name.value, overrides: overrides()});
        location.hash = `#runs/${encodeURIComponent(answer.name)}`;
      } catch (error) {
        notice.textContent = error.message;
        startButton.disabled = false;
      }
    });
    choose.addEventListener("change", load);
    gpu.addEventListener("change", check);
    if (recipes.length) await load();
    else notice.textContent = "No recipes: start the studio where a recipes/ folder is, or pass --recipes.";
  }

  function stamp() {
    const now = new Date(), pad = n => String(n).padStart(2, "0");
    return `${now.getFullYear()}${pad(now.getMonth() + 1)}${pad(now.getDate())}-${pad(now.getHours())}${pad(now.getMinutes())}`;
  }

  Studio.page({id: "new", title: "New run", render});
})();
