// Health charts of a rollout or device page: the new version against the baseline, from health.json
// (uPlot); the hybrid routing charts show once the series has routing data.
(function () {
  "use strict";
  var box = document.getElementById("charts");
  if (!box || !window.uPlot) return;
  var palette = ["#d9480f", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f08c00", "#495057"];
  var plots = {};

  function seriesData(health, metric) {
    var times = {};
    health.series.forEach(function (s) {
      s.points.forEach(function (p) { times[Date.parse(p.at) / 1000] = true; });
    });
    var xs = Object.keys(times).map(Number).sort(function (a, b) { return a - b; });
    var data = [xs];
    var series = [{}];
    health.series.forEach(function (s, i) {
      var byT = {};
      s.points.forEach(function (p) { byT[Date.parse(p.at) / 1000] = p[metric]; });
      var isNew = s.version === health.version;
      data.push(xs.map(function (t) { var v = byT[t]; return v === undefined ? null : v; }));
      series.push({
        label: s.version + (s.mode === "shadow" ? " (shadow)" : "") + (isNew ? "" : " baseline"),
        stroke: isNew ? palette[0] : palette[1 + (i % (palette.length - 1))],
        width: isNew ? 2 : 1.5, dash: isNew ? undefined : [6, 4],
        points: { show: true, size: 5 }, spanGaps: true,
      });
    });
    return { data: data, series: series };
  }

  function hasValues(health, metric) {
    return health.series.some(function (s) {
      return s.points.some(function (p) { return p[metric] !== null && p[metric] !== undefined; });
    });
  }

  function draw(health) {
    // hybrid routing charts: only once a window under a routing policy arrived; all shown before
    // any is measured, so that each plot takes the width its figure ends up with
    box.querySelectorAll("[data-hybrid]").forEach(function (figure) {
      var metric = figure.querySelector("[data-metric]").getAttribute("data-metric");
      if (hasValues(health, metric)) figure.hidden = false;
    });
    box.querySelectorAll("[data-metric]").forEach(function (el) {
      var metric = el.getAttribute("data-metric");
      var figure = el.closest("[data-hybrid]");
      if (figure && figure.hidden) return;
      var d = seriesData(health, metric);
      var key = metric + ":" + d.series.map(function (s) { return s.label; }).join("|");
      if (plots[metric] && plots[metric].key === key) { plots[metric].plot.setData(d.data); return; }
      if (plots[metric]) plots[metric].plot.destroy();
      var opts = { width: Math.max(280, el.clientWidth || 360), height: 200, series: d.series,
                   scales: { x: { time: true } }, legend: { show: true } };
      plots[metric] = { key: key, plot: new uPlot(opts, d.data, el) };
      el.setAttribute("data-points", String(d.data[0].length));
    });
  }

  function load() {
    fetch(box.getAttribute("data-health"), { headers: { "X-Fleet-Poll": "1" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (health) { if (health) draw(health); })
      .catch(function () {})
      .finally(function () { window.setTimeout(load, 5000); });
  }
  load();
})();
