// ckptlab serve: the little script the pages need (no inline script anywhere: the CSP forbids it).
// htmx sends the CSRF token from <body hx-headers>; this file adds copy buttons and the plain-form token.
"use strict";
document.addEventListener("click", (ev) => {
  const btn = ev.target.closest("[data-copy]");
  if (!btn) return;
  ev.preventDefault();
  const text = btn.getAttribute("data-copy");
  const done = () => { const old = btn.textContent; btn.textContent = "copied"; setTimeout(() => { btn.textContent = old; }, 1200); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else {
    fallbackCopy(text, done);
  }
});
function fallbackCopy(text, done) {
  const ta = document.createElement("textarea");
  ta.value = text; ta.setAttribute("readonly", ""); ta.style.position = "fixed"; ta.style.opacity = "0";
  document.body.appendChild(ta); ta.select();
  try { document.execCommand("copy"); done(); } finally { ta.remove(); }
}
