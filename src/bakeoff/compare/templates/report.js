// Draws the figures from the JSON block, switches the latency shown, sorts the table.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("bakeoff-data").textContent);
  var config = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"]};

  function draw(id, fig) {
    var el = document.getElementById(id);
    if (el && fig) { Plotly.newPlot(el, fig.data, fig.layout, config); }
  }

  var inference = data.plots.inference || {};
  function selectLatency(kind) {
    if (inference[kind]) {
      Plotly.react("plot-inference", inference[kind].data, inference[kind].layout, config);
    }
    document.querySelectorAll("[data-latency]").forEach(function (el) {
      el.hidden = el.getAttribute("data-latency") !== kind;
    });
  }
  draw("plot-training", data.plots.training);
  var kinds = Object.keys(inference);
  if (kinds.length) {
    draw("plot-inference", inference[kinds[0]]);
    selectLatency(kinds[0]);
  }
  document.querySelectorAll("input[name=latency]").forEach(function (input) {
    input.addEventListener("change", function () { selectLatency(input.value); });
  });

  // Sorting: numbers by value, text alphabetically; empty cells stay at the bottom either way.
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    headers.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var numeric = th.getAttribute("data-type") === "num";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-sort"), y = b.cells[col].getAttribute("data-sort");
          if (!x || !y) { return (x ? 0 : 1) - (y ? 0 : 1); }
          var c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
          return ascending ? c : -c;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });

  // Each model's figures are drawn when its section is first opened (hidden plots cannot size themselves).
  document.querySelectorAll("details.model").forEach(function (section) {
    section.addEventListener("toggle", function () {
      if (!section.open || section.getAttribute("data-drawn")) { return; }
      section.setAttribute("data-drawn", "1");
      var figures = data.models[section.id] || {};
      Object.keys(figures).forEach(function (name) { draw(section.id + "-" + name, figures[name]); });
    });
  });
})();
