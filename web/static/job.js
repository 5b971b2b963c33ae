// The job page: follows the job's output, state and progress over
// Server-Sent Events, and shows each line with the stream it came from.
"use strict";

(function () {
  const page = document.querySelector("[data-job-page]");
  if (!page) return;

  const MAX_LINES = 20000;
  const log = document.getElementById("log");
  const status = document.getElementById("log-status");
  const follow = document.getElementById("log-follow");
  const progress = page.querySelector("[data-progress]");
  let openLine = null;
  let lineCount = 0;
  let scrollPending = false;

  function newLine(stream, text) {
    const line = document.createElement("div");
    line.className = `line ${stream}`;
    const label = document.createElement("span");
    label.className = "stream";
    label.textContent = stream;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    line.append(label, body);
    log.append(line);
    lineCount += 1;
    if (lineCount > MAX_LINES) dropOldLines();
    return { stream, body };
  }

  function dropOldLines() {
    const lines = log.querySelectorAll(".line");
    const excess = lines.length - MAX_LINES;
    for (let index = 0; index < excess; index += 1) lines[index].remove();
    lineCount = MAX_LINES;
    if (!log.querySelector(".note.dropped")) {
      note("Older lines were removed from this view; the raw log has them all.", "dropped");
    }
  }

  // A carriage return moves back to the start of the line, as in a terminal.
  function overwrite(text) {
    if (!text.includes("\r")) return text;
    const parts = text.split("\r");
    while (parts.length > 1 && parts[parts.length - 1] === "") parts.pop();
    return parts[parts.length - 1];
  }

  function appendChunk(stream, text) {
    log.querySelector(".log-empty")?.remove();
    const pieces = text.split("\n");
    pieces.forEach((piece, index) => {
      const last = index === pieces.length - 1;
      if (index === 0 && openLine && openLine.stream === stream) {
        openLine.body.textContent = overwrite(openLine.body.textContent + piece);
      } else if (piece !== "" || !last) {
        openLine = newLine(stream, overwrite(piece));
      }
      if (!last) openLine = null;
    });
    scheduleScroll();
  }

  function note(text, extraClass = "") {
    const element = document.createElement("div");
    element.className = `note ${extraClass}`.trim();
    element.textContent = text;
    log.prepend(element);
  }

  function scheduleScroll() {
    if (scrollPending || !follow.checked) return;
    scrollPending = true;
    requestAnimationFrame(() => {
      scrollPending = false;
      log.scrollTop = log.scrollHeight;
    });
  }

  log.addEventListener("scroll", () => {
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
    if (follow.checked !== atBottom) follow.checked = atBottom;
  });
  follow.addEventListener("change", scheduleScroll);

  for (const toggle of page.querySelectorAll("[data-show-stream]")) {
    toggle.addEventListener("change", () => {
      log.classList.toggle(`hide-${toggle.dataset.showStream}`, !toggle.checked);
    });
  }
  document.getElementById("log-wrap").addEventListener("change", (event) => {
    log.classList.toggle("wrap", event.target.checked);
  });

  function setField(name, value) {
    for (const element of page.querySelectorAll(`[data-field="${name}"]`)) {
      element.textContent = value === null || value === undefined || value === "" ? "\u2013" : value;
    }
  }

  let startedAt = null;
  let clock = null;

  // While the job runs, its duration counts up here between server updates.
  function tickDuration() {
    if (startedAt === null) return;
    setField("duration", JB.formatDuration((Date.now() - startedAt) / 1000));
  }

  function updateJob(job) {
    page.dataset.state = job.state;
    startedAt = job.started_at && !job.final ? Date.parse(job.started_at) : null;
    if (startedAt !== null && clock === null) clock = setInterval(tickDuration, 1000);
    if (startedAt === null && clock !== null) {
      clearInterval(clock);
      clock = null;
    }
    JB.setBadge(page.querySelector('[data-field="state"]'), job.state, job.label);
    setField("worker", job.worker);
    setField("exit_code", job.exit_code);
    setField("signal", job.signal);
    setField("reason", job.reason);
    setField("started", JB.formatTime(job.started_at));
    setField("finished", JB.formatTime(job.finished_at));
    setField("duration", job.duration);
    setField("log_size", job.log_size + (job.log_truncated ? " (truncated)" : ""));
    for (const element of page.querySelectorAll("[data-when]")) {
      element.hidden = (element.dataset.when === "final") !== job.final;
    }
    if (job.final) JB.setProgress(progress, null);
  }

  function setStatus(text, live) {
    status.textContent = "";
    const span = document.createElement("span");
    span.textContent = text;
    if (live) span.className = "live";
    status.append(span);
  }

  const source = new EventSource(`/jobs/${page.dataset.jobId}/events`);
  source.addEventListener("open", () => setStatus("\u25cf Live", true));
  source.addEventListener("log", (event) => {
    const chunk = JSON.parse(event.data);
    appendChunk(chunk.s, chunk.t);
    if (event.lastEventId) setField("log_size", JB.formatSize(event.lastEventId));
  });
  source.addEventListener("job", (event) => updateJob(JSON.parse(event.data)));
  source.addEventListener("progress", (event) => {
    if (page.dataset.state !== "running") return;
    const value = JSON.parse(event.data);
    JB.setProgress(progress, value);
    if (value) page.querySelector("[data-no-progress]")?.remove();
  });
  source.addEventListener("skipped", (event) => {
    const skipped = JSON.parse(event.data).bytes;
    note(`The first ${skipped} bytes are not shown here; download the raw log for all of it.`);
  });
  source.addEventListener("end", () => {
    source.close();
    setStatus("Ended", false);
    page.dataset.streamEnded = "1";
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // The browser gives up when the server responds with something other
      // than an event stream, for example after the session expired.
      if (!page.dataset.streamEnded) setStatus("Disconnected: reload the page", false);
    } else {
      setStatus("Reconnecting\u2026", false);
    }
  });
})();
