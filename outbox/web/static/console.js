// The outbox console's only script: refresh marked sections in place, select rows.
(function () {
  "use strict";

  function refresher(section) {
    var url = section.getAttribute("data-refresh");
    var every = parseInt(section.getAttribute("data-interval"), 10) || 2000;
    var stamp = document.getElementById("updated");

    function tick() {
      if (document.hidden) {  // a background tab costs the database nothing
        setTimeout(tick, every);
        return;
      }
      fetch(url, { cache: "no-store", credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          section.innerHTML = html;
          section.removeAttribute("data-stale");
          if (stamp) { stamp.textContent = "updated " + new Date().toLocaleTimeString(); }
        })
        .catch(function (error) {
          section.setAttribute("data-stale", "true");
          if (stamp) { stamp.textContent = "cannot refresh (" + error.message + "), retrying"; }
        })
        .finally(function () { setTimeout(tick, every); });
    }
    setTimeout(tick, every);
  }

  document.querySelectorAll("[data-refresh]").forEach(refresher);

  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll("input[name=ids]").forEach(function (box) {
        box.checked = all.checked;
      });
    });
  }
})();
