// ckptlab serve: a job page's live progress. Reads the server-sent events of /jobs/ID/events (EventSource) and
// updates #job-status, #job-progress and #job-description; after a final state it closes the stream (an
// EventSource would reconnect forever otherwise) and fetches the panel again, for the result and its links.
// Without JavaScript the page still shows the state when it was loaded, with a "reload" link.
"use strict";
(function () {
  const FINAL = ["done", "failed", "cancelled", "lost"];

  function text(id, value) {
    const el = document.getElementById(id);
    if (el) el.textContent = value;
  }

  function update(s) {
    const status = document.getElementById("job-status");
    if (status) {
      status.textContent = s.status;
      status.className = "job-status " + s.status;
    }
    text("job-description", s.description || "");
    const bar = document.getElementById("job-progress");
    if (bar) {
      if (s.total) {
        bar.max = s.total;
        bar.value = Math.min(s.done, s.total);
        text("job-percent", Math.round(100 * Math.min(s.done, s.total) / s.total) + "%");
      } else if (s.status === "done") {
        bar.max = 1; bar.value = 1; text("job-percent", "100%");
      } else if (FINAL.indexOf(s.status) < 0) {
        bar.removeAttribute("value");
      }
    }
  }

  function refresh(panel) {
    fetch(window.location.pathname, {headers: {"HX-Request": "true"}, credentials: "same-origin"})
      .then((r) => (r.ok ? r.text() : null))
      .then((html) => {
        if (!html) return;
        const t = document.createElement("template");
        t.innerHTML = html;
        const fresh = t.content.querySelector("#job-panel");
        const current = document.getElementById("job-panel") || panel;
        if (fresh && current) {
          current.replaceWith(fresh);
          if (window.htmx) window.htmx.process(fresh);
        }
      })
      .catch(() => {});
  }

  function start() {
    const panel = document.getElementById("job-panel");
    if (!panel || panel.dataset.final === "true" || !window.EventSource) return;
    const events = new EventSource(panel.dataset.events);
    events.onmessage = (ev) => {
      let s;
      try { s = JSON.parse(ev.data); } catch (e) { return; }
      update(s);
      if (FINAL.indexOf(s.status) >= 0) {
        events.close();
        refresh(panel);
      }
    };
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
