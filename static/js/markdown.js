// Markdown for model replies, safely, with well-kept libraries (static/vendor/README.md):
// marked (GitHub-flavoured: tables, fenced code) renders, highlight.js colours code blocks, and DOMPurify
// sanitizes the result against an allow-list. Raw HTML in the text is shown as text, never parsed, and only
// http(s), mailto and same-site links become links.

import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.js";
import hljs from "../vendor/highlight.min.js";

export function escapeHtml(text) {
  return String(text)
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

const SAFE_URL = /^(https?:\/\/|mailto:|\/(?!\/))/i;
const LANGUAGE = /^[\w+#.-]{1,30}$/;

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML from the model is text.
    html(html) { return escapeHtml(typeof html === "string" ? html : html.text || ""); },
    link(href, title, text) {
      const url = String(href || "");
      if (!SAFE_URL.test(url)) return text;
      return `<a href="${escapeHtml(url)}" rel="noopener noreferrer nofollow" target="_blank">${text}</a>`;
    },
    image(href, title, text) { return escapeHtml(text || ""); },  // no remote images (offline, no tracking)
    code(code, infostring) {
      const lang = String(infostring || "").trim().split(/\s+/)[0].toLowerCase();
      const known = LANGUAGE.test(lang) && hljs.getLanguage(lang);
      let body;
      try {
        body = known ? hljs.highlight(code, { language: lang, ignoreIllegals: true }).value
          : escapeHtml(code);
      } catch {
        body = escapeHtml(code);
      }
      const label = LANGUAGE.test(lang) ? lang : "text";
      return `<div class="code-block"><div class="code-head"><span class="code-lang">${escapeHtml(label)}</span>`
        + `</div><pre><code class="hljs${known ? ` language-${escapeHtml(lang)}` : ""}">${body}</code></pre></div>\n`;
    },
  },
});

const ALLOWED_TAGS = ["p", "br", "strong", "em", "del", "code", "pre", "a", "ul", "ol", "li", "blockquote",
  "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "thead", "tbody", "tr", "th", "td", "span", "div", "input"];
const ALLOWED_ATTR = ["href", "rel", "target", "class", "align", "type", "checked", "disabled"];

DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
  if (data.attrName === "href" && !SAFE_URL.test(data.attrValue)) data.keepAttr = false;
  // Task-list checkboxes only; nothing else may be an input.
  if (node.nodeName === "INPUT" && data.attrName === "type" && data.attrValue !== "checkbox") data.keepAttr = false;
});

export function renderMarkdown(text) {
  const html = marked.parse(String(text || "").replace(/\u0000/g, ""));
  return DOMPurify.sanitize(html, { ALLOWED_TAGS, ALLOWED_ATTR, ALLOW_DATA_ATTR: false });
}
