// A run's page: polls its JSON and redraws the curves (plotly.js), the last epoch, the phases
// on a time line, the log's tail and the cost. Everything from the host is set as text.
"use strict";

(() => {
  const body = document.body;
  const liveUrl = body.dataset.liveUrl;
  const ACTIVE_POLL_MS = 2000; // a training epoch lands within seconds
  const ENDED_POLL_MS = 15000; // an ended run changes only through an action
  // Trace names are ours, never a host's: plotly reads names as its own small markup.
  const LABELS = {
    train_loss: "train loss", val_loss: "val loss", loss: "loss",
    train_acc: "train acc", val_acc: "val acc", acc: "acc", accuracy: "accuracy",
  };
  const { el } = gpuRun;
  let lastEpochs = null;

  function drawChart(id, title, series, epochs, percent) {
    const node = document.getElementById(id);
    node.dataset.points = String(epochs.length);
    if (typeof Plotly === "undefined") {
      node.textContent = "The chart library did not load (is plotly installed?).";
      return;
    }
    const traces = Object.keys(series).map((key) => ({
      x: epochs, y: series[key].map((v) => (v === null || !percent ? v : v * 100)),
      name: LABELS[key] || "series", type: "scatter", mode: "lines+markers",
    }));
    const layout = {
      title: { text: title }, height: 300, margin: { l: 50, r: 20, t: 40, b: 40 },
      xaxis: { title: { text: "epoch" }, dtick: epochs.length <= 20 ? 1 : undefined },
      yaxis: { title: { text: percent ? "%" : "" } }, legend: { orientation: "h" },
    };
    Plotly.react(node, traces, layout, { displaylogo: false, responsive: true });
  }

  function drawLastEpoch(rows) {
    const tbody = document.querySelector("#last-epoch tbody");
    tbody.replaceChildren(...rows.map(([name, value]) => {
      const tr = el("tr");
      tr.append(el("th", name), el("td", value));
      return tr;
    }));
  }

  function drawPhases(phases, now) {
    const svg = document.getElementById("phase-line");
    const NS = "http://www.w3.org/2000/svg";
    svg.replaceChildren();
    const tbody = document.querySelector("#phase-table tbody");
    tbody.replaceChildren(...phases.map((p) => {
      const tr = el("tr");
      tr.append(el("td", p.phase), el("td", p.status, p.status), el("td", p.ended_at ? p.duration : "running"),
                el("td", p.detail));
      return tr;
    }));
    if (!phases.length) return;
    const start = Math.min(...phases.map((p) => p.started_at));
    const end = Math.max(...phases.map((p) => p.ended_at || now));
    const span = Math.max(end - start, 1);
    phases.forEach((p) => {
      const x = ((p.started_at - start) / span) * 1000;
      const w = Math.max((((p.ended_at || now) - p.started_at) / span) * 1000, 2);
      const rect = document.createElementNS(NS, "rect");
      rect.setAttribute("x", x.toFixed(1));
      rect.setAttribute("y", "4");
      rect.setAttribute("width", w.toFixed(1));
      rect.setAttribute("height", "32");
      rect.setAttribute("class", `phase ${p.phase} ${p.status}`);
      const tip = document.createElementNS(NS, "title");
      tip.textContent = `${p.phase}: ${p.status}, ${p.ended_at ? p.duration : "running"}`;
      rect.append(tip);
      const label = document.createElementNS(NS, "text");
      label.setAttribute("x", (x + 4).toFixed(1));
      label.setAttribute("y", "25");
      label.textContent = p.phase;
      svg.append(rect, label);
    });
  }

  function drawCost(cost) {
    document.getElementById("cost-text").textContent = cost.text + (cost.billed_s !== null ? ` (${cost.billed_s} s billed)` : "");
    const meter = document.getElementById("budget-meter");
    const budgetText = document.getElementById("budget-text");
    if (cost.budget && cost.amount !== null) {
      meter.max = cost.budget;
      meter.high = cost.budget * 0.8;
      meter.value = Math.min(cost.amount, cost.budget);
      meter.hidden = false;
      budgetText.textContent = `of a ${cost.budget.toFixed(2)} ${cost.currency} budget (${Math.round((cost.amount / cost.budget) * 100)}%)`;
    } else {
      meter.hidden = true;
      budgetText.textContent = "(no budget set)";
    }
  }

  function drawStop(stop) {
    const node = document.getElementById("run-stop");
    const parts = stop.failed ? [el("span", "NOT STOPPED ", "red")] : [];
    node.replaceChildren(...parts, `${stop.state}${stop.detail ? ": " + stop.detail : ""}`);
  }

  function draw(data) {
    if (body.dataset.active === "yes" && !data.active && !body.dataset.actionRunning) {
      // The run ended: its buttons, files and figures are another page's now.
      window.location.reload();
      return false;
    }
    drawStop(data.stop);
    const status = document.getElementById("run-status");
    status.textContent = data.status;
    status.className = `status ${data.status}`;
    document.getElementById("run-duration").textContent = data.duration;
    document.getElementById("run-best").textContent = data.best_acc;
    const m = data.metrics;
    const key = JSON.stringify([m.epochs, m.charts]);
    if (key !== lastEpochs) { // redraw the charts only when an epoch came or changed
      lastEpochs = key;
      drawChart("loss-chart", "Loss", m.charts.loss || {}, m.epochs, false);
      drawChart("accuracy-chart", "Accuracy", m.charts.accuracy || {}, m.epochs, true);
    }
    document.getElementById("curves-note").textContent = m.epochs.length
      ? `${m.epochs.length} epoch(s)` + (m.skipped ? `; ${m.skipped} unreadable line(s) of metrics.jsonl left out` : "")
      : "No epoch has ended yet.";
    drawLastEpoch(m.last);
    drawPhases(data.phases, data.now);
    const log = document.getElementById("log");
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = data.log.lines.join("\n");
    if (atBottom) log.scrollTop = log.scrollHeight;
    document.getElementById("log-note").textContent = data.log.cut ? "(the last lines)" : "";
    drawCost(data.cost);
    body.dataset.polls = String(Number(body.dataset.polls || 0) + 1);
    return data.active;
  }

  async function poll() {
    let active = true;
    try {
      active = draw(await gpuRun.getJSON(liveUrl));
    } catch (error) {
      document.getElementById("curves-note").textContent = `The dashboard does not answer (${error.message}); trying again.`;
    }
    setTimeout(poll, active ? ACTIVE_POLL_MS : ENDED_POLL_MS);
  }

  document.addEventListener("gpu-run:action-done", (event) => {
    // A stop, pull or report changes the files and the buttons: show the page as it is now
    // (the result box comes back after the reload).
    if (event.detail.state === "done") setTimeout(() => window.location.reload(), 1500);
  });
  poll();
})();
