// Every page: the confirm step before an action, the action's POST and its result, and the red
// NOT STOPPED banner kept current. Text from the server is set with textContent, never as HTML.
"use strict";

const gpuRun = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  }

  // The confirm step: a dialog that says what the action does; resolves true on "Yes".
  function confirmStep(text) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise((resolve) => {
      const yes = document.getElementById("confirm-yes");
      const no = document.getElementById("confirm-no");
      const done = (answer) => {
        yes.removeEventListener("click", onYes);
        no.removeEventListener("click", onNo);
        dialog.removeEventListener("cancel", onNo);
        dialog.close();
        resolve(answer);
      };
      const onYes = () => done(true);
      const onNo = () => done(false);
      yes.addEventListener("click", onYes);
      no.addEventListener("click", onNo);
      dialog.addEventListener("cancel", onNo);
      dialog.showModal();
    });
  }

  function showResult(text, state) {
    const box = document.getElementById("action-result");
    box.hidden = false;
    box.className = state;
    box.textContent = text;
    // A run's page reloads when its run ends or an action changed it: the result outlives that.
    if (document.body.dataset.runId && state !== "running") {
      sessionStorage.setItem("gpu-run:result", JSON.stringify({ text, state }));
    }
  }

  async function runAction(button) {
    const run = button.dataset.run;
    const kind = button.dataset.action;
    if (!(await confirmStep(button.dataset.confirm))) return;
    button.disabled = true;
    document.body.dataset.actionRunning = "yes"; // a run's page waits for it before reloading
    showResult(`${kind} of ${run}: under way...`, "running");
    try {
      const response = await fetch(`/runs/${encodeURIComponent(run)}/${encodeURIComponent(kind)}`, {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
      });
      let action = await response.json();
      if (!response.ok) throw new Error(action.error || response.status);
      while (action.state === "running") {
        await new Promise((r) => setTimeout(r, 1000));
        action = await getJSON(`/api/actions/${encodeURIComponent(action.action)}`);
      }
      const lines = action.output && action.output.length ? "\n" + action.output.join("\n") : "";
      showResult(`${kind} of ${run}: ${action.state}: ${action.message}${lines}`, action.ok ? "done" : "failed");
      document.dispatchEvent(new CustomEvent("gpu-run:action-done", { detail: action }));
    } catch (error) {
      showResult(`${kind} of ${run}: refused: ${error.message}`, "failed");
    } finally {
      button.disabled = false;
      delete document.body.dataset.actionRunning;
      refreshBanner();
    }
  }

  function bannerButton(item) {
    const button = el("button", "Retry the stop", "action danger");
    button.type = "button";
    button.dataset.action = item.active ? "stop" : "retry-stop";
    button.dataset.run = item.run_id;
    button.dataset.confirm = `Try again to stop the machine of run ${item.run_id} on ${item.host}?`;
    return button;
  }

  async function refreshBanner() {
    let items;
    try {
      items = await getJSON("/api/not-stopped");
    } catch (error) {
      return; // the next tick tries again
    }
    const banner = document.getElementById("not-stopped");
    const list = document.getElementById("not-stopped-list");
    banner.querySelector("h2").textContent = `NOT STOPPED: ${items.length} machine(s) may still be billing`;
    const nodes = items.map((item) => {
      const li = el("li");
      li.dataset.run = item.run_id;
      const link = el("a", item.run_id);
      link.href = `/runs/${encodeURIComponent(item.run_id)}`;
      li.append(link, ` on ${item.host}: ${item.detail} `, bannerButton(item));
      return li;
    });
    list.replaceChildren(...nodes);
    banner.hidden = items.length === 0;
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button.action");
    if (button) runAction(button);
  });
  document.addEventListener("change", (event) => {
    if (event.target.matches("select.autosubmit")) event.target.form.submit();
  });
  // The runs page: the compare checkboxes are made on asking (a thousand inputs slow its load).
  const pick = document.getElementById("pick-compare");
  if (pick) {
    pick.addEventListener("click", () => {
      for (const cell of document.querySelectorAll("#runs-table td.pick")) {
        const box = el("input");
        box.type = "checkbox";
        box.name = "runs";
        box.value = cell.parentElement.dataset.run;
        box.setAttribute("form", "compare-form");
        box.setAttribute("aria-label", `compare ${box.value}`);
        cell.replaceChildren(box);
      }
      pick.hidden = true;
      document.getElementById("compare-ticked").hidden = false;
    });
  }
  setInterval(refreshBanner, 15000);
  // An action's result, kept across the reload that shows the run as the action left it.
  const kept = sessionStorage.getItem("gpu-run:result");
  if (kept) {
    const { text, state } = JSON.parse(kept);
    showResult(text, state);
    sessionStorage.removeItem("gpu-run:result"); // shown once
  }

  return { el, getJSON, refreshBanner };
})();
