// headroom's pages: draws each chart of the page with uPlot from the JSON
// island #chart-data, and after drawing writes what it plotted into the
// chart's data attributes (data-drawn, data-plotted), which the browser
// tests read. Errors and content-security-policy violations are written
// into <html data-errors>. The tables under the charts hold the same
// numbers and are what a browser without JavaScript shows.
(function () {
  "use strict";
  var root = document.documentElement;
  var errors = [];
  function report(message) {
    errors.push(message);
    root.setAttribute("data-errors", JSON.stringify(errors));
  }
  window.addEventListener("error", function (e) {
    report("error: " + e.message);
  });
  document.addEventListener("securitypolicyviolation", function (e) {
    report("csp: " + e.violatedDirective + " " + e.blockedURI);
  });

  var colours = {
    used: "#2f6fbd",
    purchased: "#2e8540",
    cap: "#c0392b",
    band: "rgba(230, 126, 34, 0.18)",
    denied: "#c0392b"
  };

  // Times are UTC, whatever the browser's zone.
  function utc(ts) {
    return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC");
  }

  function width(el) {
    return Math.max(320, Math.min(1100, el.clientWidth || 800));
  }

  function bars() {
    return uPlot.paths.bars({ size: [0.7, 40] });
  }

  // Tick labels in 24-hour UTC: the hour within a day, the date for days.
  function ticks(bucket) {
    var fmt = uPlot.fmtDate(bucket === "hour" ? "{MM}-{DD} {HH}:{mm}" : "{YYYY}-{MM}-{DD}");
    return function (u, splits) {
      return splits.map(function (ts) { return fmt(utc(ts)); });
    };
  }

  function options(el, title, series, extra) {
    var opts = {
      title: title,
      width: width(el),
      height: 240,
      tzDate: utc,
      series: [{ label: "Time (UTC)" }].concat(series),
      axes: [
        { label: "UTC", values: ticks(extra.bucket), space: 90 },
        { label: extra.yLabel || "" }
      ],
      scales: { y: { range: function (u, min, max) { return [0, Math.max(1, max) * 1.1]; } } },
      legend: { show: true }
    };
    if (extra.bands) {
      opts.bands = extra.bands;
    }
    return opts;
  }

  // Draws one chart and records what uPlot holds once it has drawn.
  function plot(fig, opts, data, names) {
    var target = fig.querySelector(".plot");
    opts.hooks = {
      draw: [function (u) {
        var plotted = {};
        names.forEach(function (name, i) {
          plotted[name] = u.data[i + 1];
        });
        fig.setAttribute("data-plotted", JSON.stringify(plotted));
        fig.setAttribute("data-points", String(u.data[0].length));
        fig.setAttribute("data-drawn", "true");
      }]
    };
    new uPlot(opts, data, target);
    var numbers = fig.parentNode.querySelector("details.numbers");
    if (numbers) {
      numbers.open = false;
    }
  }

  function flat(t, value) {
    return t.map(function () { return value; });
  }

  function seats(fig, d) {
    var s = d.seats;
    var series = [
      { label: "Peak in use", stroke: colours.used, width: 2 },
      { label: "Purchased", stroke: colours.purchased, dash: [6, 4] }
    ];
    var data = [d.t, s.peak, flat(d.t, s.purchased)];
    var names = ["peak", "purchased"];
    var extra = { yLabel: "seats", bucket: d.bucket };
    if (s.cap !== null) {
      series.push({ label: "Cap", stroke: colours.cap, dash: [2, 3] });
      data.push(flat(d.t, s.cap));
      names.push("cap");
      // The overdraft band: between purchased (series 2) and the cap (3).
      extra.bands = [{ series: [3, 2], fill: colours.band }];
    }
    plot(fig, options(fig, "Seats in use", series, extra), data, names);
  }

  function seatDenials(fig, d) {
    var series = [{ label: "Denied", stroke: colours.denied, fill: colours.denied, paths: bars() }];
    plot(fig, options(fig, "Denied activations", series, { yLabel: "denied", bucket: d.bucket }),
      [d.t, d.seats.denied], ["denied"]);
  }

  function feature(fig, d) {
    var key = fig.getAttribute("data-feature");
    var f = d.features.filter(function (x) { return x.key === key; })[0];
    if (!f) {
      report("no data for feature " + key);
      return;
    }
    var series = [
      { label: "Used", stroke: colours.used, fill: "rgba(47, 111, 189, 0.35)", paths: bars() },
      { label: "Denied", stroke: colours.denied, width: 2 }
    ];
    plot(fig, options(fig, key, series, { yLabel: key, bucket: d.bucket }), [d.t, f.added, f.denied], ["used", "denied"]);
  }

  function draw() {
    var island = document.getElementById("chart-data");
    if (!island) {
      return;
    }
    var d = JSON.parse(island.textContent);
    var charts = { seats: seats, seat_denials: seatDenials, feature: feature };
    var figures = document.querySelectorAll("figure[data-chart]");
    for (var i = 0; i < figures.length; i++) {
      var fig = figures[i];
      var kind = charts[fig.getAttribute("data-chart")];
      try {
        if (kind) {
          kind(fig, d);
        }
      } catch (e) {
        report("chart " + fig.getAttribute("data-chart") + ": " + e);
      }
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
