// The chat page: one prompt answered by the base and by each run chosen, side by side, on one loaded base.
"use strict";

(() => {
  const {api, el} = Studio;

  async function render(main) {
    const runs = (await api("/api/runs")).filter(run => run.state === "finished" && run.generates);
    if (!runs.length) { main.append(el("p", {class: "muted"}, "No finished run to chat with yet.")); return; }
    const boxes = runs.map((run, i) => el("label", {class: "set"},
      el("input", {type: "checkbox", value: run.name, checked: i === 0, "data-run": run.name}), ` ${run.name} `));
    const base = el("input", {type: "checkbox", id: "with-base", checked: true});
    const prompt = el("textarea", {id: "prompt", rows: 3, cols: 90},
                      "Tom buys 3 boxes of 12 pens and gives away 5. How many pens are left?");
    const temperature = el("input", {id: "temperature", value: "0", size: 4});
    const tokens = el("input", {id: "max-new-tokens", value: "128", size: 5});
    const seed = el("input", {id: "seed", value: "0", size: 5});
    const send = el("button", {id: "send", class: "primary"}, "Answer");
    const notice = el("p", {class: "error"}), answers = el("div", {id: "answers", class: "answers"});
    main.append(el("p", {}, "Adapters: ", boxes, el("label", {}, base, " the base alone")), prompt,
                el("p", {}, el("label", {}, "temperature (0: greedy) ", temperature), " ",
                   el("label", {}, "longest answer ", tokens), " ", el("label", {}, "seed ", seed), " ", send),
                notice, answers);

    send.addEventListener("click", async () => {
      notice.textContent = "";
      send.disabled = true;
      answers.replaceChildren(el("p", {class: "muted"}, "Answering (the first question loads the base)..."));
      try {
        const answer = await api("/api/chat", {
          prompt: prompt.value, base: base.checked, temperature: Number(temperature.value),
          max_new_tokens: Number(tokens.value), seed: Number(seed.value),
          runs: boxes.map(box => box.querySelector("input")).filter(box => box.checked).map(box => box.value)});
        answers.replaceChildren(...answer.answers.map(a => el("div", {class: "panel answer", "data-name": a.name},
          el("strong", {}, a.name), el("span", {class: "muted"}, ` ${a.seconds.toFixed(1)} s`),
          el("pre", {class: "reply"}, a.text))));
      } catch (error) {
        answers.replaceChildren();
        notice.textContent = error.message;
      } finally {
        send.disabled = false;
      }
    });
  }

  Studio.page({id: "chat", title: "Chat", render});
})();
