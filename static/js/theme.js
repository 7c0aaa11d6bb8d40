// Light or dark: the system's choice unless the user picked one (kept in localStorage). Loaded in <head>
// (a classic script, before the styles apply) so a dark page never flashes light.
(function () {
  const KEY = "aiw-theme";
  const root = document.documentElement;
  function stored() { try { return localStorage.getItem(KEY); } catch { return null; } }
  function systemDark() { return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches; }
  function apply(theme) {
    const dark = theme ? theme === "dark" : systemDark();
    root.dataset.theme = dark ? "dark" : "light";
    const light = document.getElementById("hljs-light");
    const darkSheet = document.getElementById("hljs-dark");
    if (light && darkSheet) { light.media = dark ? "not all" : "all"; darkSheet.media = dark ? "all" : "not all"; }
  }
  apply(stored());
  document.addEventListener("DOMContentLoaded", () => {
    apply(stored());
    const button = document.getElementById("theme-toggle");
    if (!button) return;
    const label = () => { button.textContent = root.dataset.theme === "dark" ? "Light mode" : "Dark mode"; };
    label();
    button.addEventListener("click", () => {
      const next = root.dataset.theme === "dark" ? "light" : "dark";
      try { localStorage.setItem(KEY, next); } catch { /* private mode: this page only */ }
      apply(next);
      label();
    });
  });
}());
