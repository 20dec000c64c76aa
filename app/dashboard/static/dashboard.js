// Draws the overview's jobs-per-minute chart with uPlot from /dashboard/throughput.json and
// refreshes it every 30 s. The rest of the live refresh is htmx (hx-trigger="every 5s").
(function () {
  "use strict";
  var REFRESH_MS = 30000;

  function draw(el, data, plot) {
    var rows = [data.t, data.succeeded, data.failed];
    if (plot) { plot.setData(rows); return plot; }
    var opts = {
      width: Math.max(320, el.clientWidth - 8), height: 220,
      series: [{}, {label: "succeeded", stroke: "#1f7a3a", fill: "rgba(31,122,58,0.12)"},
               {label: "dead", stroke: "#b3261e"}],
      axes: [{}, {label: "jobs / min"}],
      scales: {x: {time: true}}
    };
    return new uPlot(opts, rows, el);
  }

  function start() {
    var el = document.getElementById("chart");
    if (!el || typeof uPlot === "undefined") { return; }
    var plot = null;
    function load() {
      fetch(el.dataset.src, {credentials: "same-origin", headers: {Accept: "application/json"}})
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) { if (data) { plot = draw(el, data, plot); } })
        .catch(function () { /* the next refresh tries again */ });
    }
    load();
    setInterval(load, REFRESH_MS);
    window.addEventListener("resize", function () {
      if (plot) { plot.setSize({width: Math.max(320, el.clientWidth - 8), height: 220}); }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else { start(); }
})();
