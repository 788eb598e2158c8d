// fleetota dashboard: confirmations on action forms and short polling of live partials.
(function () {
  "use strict";
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) ev.preventDefault();
  });
  document.querySelectorAll("[data-poll]").forEach(function (el) {
    var url = el.getAttribute("data-poll");
    var every = parseInt(el.getAttribute("data-poll-ms") || "2000", 10);
    function poll() {
      fetch(url, { headers: { "X-Fleet-Poll": "1" }, credentials: "same-origin" })
        .then(function (r) {
          if (r.status === 401) { window.location = "/ui/login?message=signed+out"; return null; }
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined) {
            el.innerHTML = html;
            el.dispatchEvent(new CustomEvent("fleet:updated", { bubbles: true }));
          }
        })
        .catch(function () { /* the server is restarting: try again on the next tick */ })
        .finally(function () { window.setTimeout(poll, every); });
    }
    window.setTimeout(poll, every);
  });
})();
