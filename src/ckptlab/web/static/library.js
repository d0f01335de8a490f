// ckptlab serve, library page: small conveniences around the filter form (everything works without them).
// - a filter drop-down (details.facet) closes on a click outside it or on Escape;
// - "/" focuses the search box (as on many sites), unless the user is typing in a field;
// - a card preview that fails to load is replaced by the kind placeholder.
"use strict";
document.addEventListener("click", (ev) => {
  for (const d of document.querySelectorAll("details.facet[open]")) {
    if (!d.contains(ev.target)) d.removeAttribute("open");
  }
});
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape") {
    for (const d of document.querySelectorAll("details.facet[open]")) d.removeAttribute("open");
    return;
  }
  const t = ev.target;
  const typing = t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
  if (ev.key === "/" && !typing && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
    const q = document.getElementById("q");
    if (q) { ev.preventDefault(); q.focus(); q.select(); }
  }
});
// A preview that fails to load (deleted since the page rendered) becomes the kind placeholder, not a broken image.
document.addEventListener("error", (ev) => {
  const img = ev.target;
  if (!(img instanceof HTMLImageElement) || !img.closest(".card .thumb")) return;
  const card = img.closest(".card");
  const ph = document.createElement("span");
  ph.className = "ph";
  ph.dataset.kind = (card && card.dataset.kind) || "unknown";
  const label = document.createElement("span");
  label.textContent = ph.dataset.kind;
  ph.appendChild(label);
  img.replaceWith(ph);
}, true);
