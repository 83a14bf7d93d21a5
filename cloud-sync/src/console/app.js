// Outpost console: live refresh of the parts marked data-live, over server-sent events.
// Forms stay untouched (they live outside data-live parts), so typing is never interrupted.
(function () {
  "use strict";
  const badge = () => document.getElementById("live");
  function state(s, text) {
    const b = badge();
    if (b) { b.dataset.state = s; b.textContent = text; }
  }
  // A live part holding a form the operator is filling in waits for the next change.
  function editing(el) {
    if (el.contains(document.activeElement) && document.activeElement.matches("input, textarea, select")) return true;
    return Array.from(el.querySelectorAll("input:not([type=hidden]), textarea"))
      .some((i) => i.value !== i.defaultValue);
  }
  let busy = false, again = false;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const r = await fetch(location.href, { headers: { "Accept": "text/html" }, cache: "no-store" });
      if (r.ok) {
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        document.querySelectorAll("[data-live]").forEach((el) => {
          const fresh = doc.getElementById(el.id);
          if (fresh && fresh.innerHTML !== el.innerHTML && !editing(el)) el.innerHTML = fresh.innerHTML;
        });
        document.body.dataset.refreshed = String(Date.now());
        remember();
        clock();
      }
    } catch (e) {
      state("down", "offline");
    } finally {
      busy = false;
      if (again) { again = false; refresh(); }
    }
  }
  // One stream per visible page: browsers allow only six HTTP/1.1 connections per host, so a
  // stream left open by a page navigated away from, or by a background tab, would starve the rest.
  let es = null;
  function connect() {
    if (es) return;
    es = new EventSource("/console/live");
    es.onopen = () => { state("up", "live"); refresh(); };
    es.addEventListener("change", refresh);
    es.onerror = () => state("down", "reconnecting…");
  }
  function disconnect() {
    if (es) { es.close(); es = null; state("connecting", "paused"); }
  }
  window.addEventListener("pagehide", disconnect);
  window.addEventListener("pageshow", (e) => { if (e.persisted) connect(); });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") disconnect(); else connect();
  });
  // Remember who the operator is, so approvals carry a name without retyping it.
  function remember() {
    document.querySelectorAll("input[data-remember]").forEach((el) => {
      const key = "outpost." + el.dataset.remember;
      // As the default, so a remembered name does not count as typing (see editing()).
      if (!el.value) el.defaultValue = localStorage.getItem(key) || "";
      el.addEventListener("change", () => localStorage.setItem(key, el.value));
    });
  }
  // A definition file read into the textarea, so it is posted with the form.
  function files() {
    document.querySelectorAll("input[type=file][data-fills]").forEach((el) => {
      el.addEventListener("change", async () => {
        const f = el.files && el.files[0];
        const target = el.form && el.form.elements[el.dataset.fills];
        if (f && target) target.value = await f.text();
      });
    });
  }
  // Times are written in UTC; shown in the browser's time zone unless the operator chose UTC.
  // The other form is in the tooltip either way.
  const pad = (n) => String(n).padStart(2, "0");
  function local(d) {
    const off = -d.getTimezoneOffset();
    const zone = (off >= 0 ? "+" : "-") + pad(Math.floor(Math.abs(off) / 60)) + ":" + pad(Math.abs(off) % 60);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + " " + zone;
  }
  function clock() {
    const utc = localStorage.getItem("outpost.clock") === "utc";
    const b = document.getElementById("clock");
    if (b) b.textContent = utc ? "times: UTC" : "times: local";
    document.querySelectorAll("time[datetime]").forEach((t) => {
      const iso = t.getAttribute("datetime");
      const d = new Date(iso);
      if (isNaN(d.getTime())) return;
      const shown = utc ? iso : local(d);
      t.title = utc ? local(d) : iso;
      if (t.classList.contains("at")) t.textContent = shown;
    });
  }
  function clockButton() {
    const b = document.getElementById("clock");
    if (!b) return;
    b.addEventListener("click", () => {
      const utc = localStorage.getItem("outpost.clock") === "utc";
      localStorage.setItem("outpost.clock", utc ? "local" : "utc");
      clock();
    });
  }
  document.addEventListener("DOMContentLoaded", () => { remember(); files(); clockButton(); clock(); connect(); });
})();
