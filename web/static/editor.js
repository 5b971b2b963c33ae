// A light code editor on a textarea: line numbers, Tab indents (Escape then
// Tab moves focus on), Enter keeps the indentation, Ctrl+S saves the form.
"use strict";

(function () {
  const INDENT = "    ";

  function insert(area, text) {
    area.focus();
    // execCommand keeps the browser's undo history; setRangeText is the fallback.
    if (!document.execCommand || !document.execCommand("insertText", false, text)) {
      area.setRangeText(text, area.selectionStart, area.selectionEnd, "end");
      area.dispatchEvent(new Event("input"));
    }
  }

  function currentIndent(area) {
    const start = area.value.lastIndexOf("\n", area.selectionStart - 1) + 1;
    return /^[ \t]*/.exec(area.value.slice(start, area.selectionStart))[0];
  }

  for (const editor of document.querySelectorAll("[data-editor]")) {
    const area = editor.querySelector("textarea");
    const gutter = editor.querySelector(".gutter");
    let shownLines = 0;
    let tabEscapes = false;

    const renumber = () => {
      const lines = area.value.split("\n").length;
      if (lines === shownLines) return;
      shownLines = lines;
      gutter.textContent = Array.from({ length: lines }, (_, index) => index + 1).join("\n");
    };
    renumber();
    area.addEventListener("input", renumber);
    area.addEventListener("scroll", () => {
      gutter.scrollTop = area.scrollTop;
    });

    area.addEventListener("keydown", (event) => {
      const plain = !event.ctrlKey && !event.metaKey && !event.altKey;
      if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "s") {
        event.preventDefault();
        area.form?.requestSubmit();
        return;
      }
      if (area.readOnly) return;
      if (event.key === "Escape") {
        tabEscapes = true;
        return;
      }
      if (event.key === "Tab" && plain && !event.shiftKey && !tabEscapes) {
        event.preventDefault();
        insert(area, INDENT);
      } else if (event.key === "Enter" && plain && !event.shiftKey) {
        event.preventDefault();
        insert(area, `\n${currentIndent(area)}`);
      }
      tabEscapes = false;
    });
  }
})();
