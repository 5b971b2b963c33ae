// The jobs list: refreshes the state, worker, exit code and progress of the
// waiting and running jobs on the page every few seconds.
"use strict";

(function () {
  const table = document.querySelector("[data-jobs-table]");
  if (!table) return;
  const POLL_MS = 3000;

  function activeIds() {
    return Array.from(table.querySelectorAll("tr[data-job-id][data-active]"), (row) => row.dataset.jobId);
  }

  function setCell(row, name, value) {
    const cell = row.querySelector(`[data-field="${name}"]`);
    if (cell) cell.textContent = value === null || value === undefined || value === "" ? "\u2013" : value;
  }

  function update(items) {
    for (const job of items) {
      const row = table.querySelector(`tr[data-job-id="${job.id}"]`);
      if (!row) continue;
      JB.setBadge(row.querySelector('[data-field="state"]'), job.state, job.label);
      setCell(row, "worker", job.worker);
      setCell(row, "exit_code", job.exit_code);
      setCell(row, "duration", job.duration);
      JB.setProgress(row.querySelector("[data-progress]"), job.final ? null : job.progress);
      if (job.final) delete row.dataset.active;
    }
  }

  async function poll() {
    const ids = activeIds();
    if (!ids.length) return;
    try {
      const response = await fetch(`/jobs/status?ids=${ids.join(",")}`, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (response.ok) update((await response.json()).jobs);
    } catch (error) {
      // The next round tries again; a brief network gap needs no message.
    }
    setTimeout(poll, POLL_MS);
  }

  setTimeout(poll, POLL_MS);
})();
