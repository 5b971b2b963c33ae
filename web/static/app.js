// Shared page behaviour: confirmation dialogs, forms sent in the background,
// toasts, progress bars, local times and copy buttons. Every page also works
// without this file: forms then post normally and the server shows a
// confirmation page instead of the dialog.
"use strict";

(function () {
  const csrfToken =
    document.querySelector('meta[name="csrf-token"]')?.getAttribute("content") || "";
  const PENDING_TOAST_KEY = "jobbalancer.toast";

  function toast(message, level = "info", timeoutMs = 6000) {
    const box = document.getElementById("toasts");
    if (!box || !message) return;
    const item = document.createElement("div");
    item.className = `toast toast-${level}`;
    item.setAttribute("role", level === "error" ? "alert" : "status");
    const text = document.createElement("span");
    text.textContent = message;
    const close = document.createElement("button");
    close.type = "button";
    close.className = "flash-close";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "\u00d7";
    close.addEventListener("click", () => item.remove());
    item.append(text, close);
    box.append(item);
    if (timeoutMs) setTimeout(() => item.remove(), timeoutMs);
  }

  function confirmAction(message, buttonLabel) {
    const dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") {
      return Promise.resolve(window.confirm(message));
    }
    dialog.querySelector("[data-confirm-text]").textContent = message;
    dialog.querySelector("[data-confirm-ok]").textContent = buttonLabel || "Confirm";
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {
        once: true,
      });
      dialog.showModal();
      dialog.querySelector("[data-confirm-cancel]").focus();
    });
  }

  function markConfirmed(form) {
    let input = form.querySelector('input[name="confirmed"]');
    if (!input) {
      input = document.createElement("input");
      input.type = "hidden";
      input.name = "confirmed";
      form.append(input);
    }
    input.value = "1";
    return input;
  }

  async function sendForm(form, submitter) {
    const body = new FormData(form, submitter || null);
    const buttons = form.querySelectorAll("button");
    buttons.forEach((button) => (button.disabled = true));
    let data;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body,
        credentials: "same-origin",
        headers: { "X-Requested-With": "fetch", Accept: "application/json" },
      });
      data = await response.json().catch(() => ({
        ok: false,
        message: `The server responded with status ${response.status}.`,
      }));
    } catch (error) {
      data = { ok: false, message: "The server did not respond: check the connection." };
    } finally {
      buttons.forEach((button) => (button.disabled = false));
      form.querySelector('input[name="confirmed"]')?.remove();
    }
    const level = data.level || (data.ok ? "ok" : "error");
    if (data.redirect) {
      sessionStorage.setItem(PENDING_TOAST_KEY, JSON.stringify([data.message, level]));
      window.location.assign(data.redirect);
      return;
    }
    const target = form.dataset.result && document.getElementById(form.dataset.result);
    if (target) {
      target.textContent = data.message;
      target.className = `result ${data.ok ? "ok" : "error"}`;
      target.hidden = false;
    } else {
      toast(data.message, level);
    }
    form.dispatchEvent(new CustomEvent("jb:done", { bubbles: true, detail: data }));
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || form.method === "dialog") return;
    const submitter = event.submitter;
    const question = form.dataset.confirm;
    const background = form.hasAttribute("data-async");
    if (question && form.dataset.confirmed !== "1") {
      event.preventDefault();
      if (!(await confirmAction(question, form.dataset.confirmButton))) return;
      markConfirmed(form);
      if (background) {
        sendForm(form, submitter);
      } else {
        form.dataset.confirmed = "1";
        form.requestSubmit(submitter || undefined);
      }
      return;
    }
    delete form.dataset.confirmed;
    if (background) {
      event.preventDefault();
      sendForm(form, submitter);
    }
  });

  function formatSeconds(seconds) {
    const total = Math.max(0, Math.round(seconds));
    if (total < 60) return `${total} s`;
    const minutes = Math.floor(total / 60);
    if (minutes < 60) return `${minutes} min ${String(total % 60).padStart(2, "0")} s`;
    return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} min`;
  }

  // Same formats as the server's durations: "850 ms", "42.1 s", "3 min 05 s".
  function formatDuration(seconds) {
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    return formatSeconds(seconds);
  }

  function formatSize(bytes) {
    let size = Number(bytes) || 0;
    if (size < 1024) return `${size} bytes`;
    for (const unit of ["KiB", "MiB", "GiB"]) {
      size /= 1024;
      if (size < 1024 || unit === "GiB") return `${size.toFixed(1)} ${unit}`;
    }
    return `${size.toFixed(1)} GiB`;
  }

  function setProgress(element, progress) {
    if (!element) return;
    if (!progress) {
      element.hidden = true;
      return;
    }
    element.hidden = false;
    element.querySelector("progress").value = progress.percent;
    let text = `${progress.percent}%`;
    if (progress.eta_seconds !== null && progress.eta_seconds !== undefined) {
      text += ` \u00b7 ${formatSeconds(progress.eta_seconds)} left`;
    }
    element.querySelector(".progress-text").textContent = text;
  }

  function setBadge(element, state, label) {
    if (!element) return;
    element.className = element.className.replace(/\bstate-\S+/g, "").trim();
    element.classList.add(`state-${state}`);
    element.textContent = label;
  }

  function formatTime(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return iso;
    return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
  }

  function localizeTimes(root = document) {
    for (const element of root.querySelectorAll("time.local[datetime]")) {
      element.title = element.textContent;
      element.textContent = formatTime(element.getAttribute("datetime"));
    }
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-copy]");
    if (button) {
      const source = document.getElementById(button.dataset.copy);
      try {
        await copyText(source ? source.textContent : "");
        toast("Copied to the clipboard.", "ok", 2500);
      } catch (error) {
        toast("Copying failed: select the text and copy it by hand.", "error");
      }
      return;
    }
    const close = event.target.closest(".flash .flash-close");
    if (close) close.closest(".flash").remove();
  });

  document.addEventListener("DOMContentLoaded", () => {
    localizeTimes();
    // On narrow screens a wide chart scrolls; start at its newest end.
    for (const chart of document.querySelectorAll(".chart")) {
      chart.scrollLeft = chart.scrollWidth;
    }
    const pending = sessionStorage.getItem(PENDING_TOAST_KEY);
    if (pending) {
      sessionStorage.removeItem(PENDING_TOAST_KEY);
      try {
        const [message, level] = JSON.parse(pending);
        toast(message, level);
      } catch (error) {
        // A malformed entry is dropped; it only carried a message.
      }
    }
  });

  window.JB = {
    csrfToken,
    toast,
    setProgress,
    setBadge,
    formatSeconds,
    formatDuration,
    formatSize,
    formatTime,
    localizeTimes,
  };
})();
