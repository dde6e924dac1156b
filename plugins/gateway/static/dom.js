// Small DOM helpers of the console (no framework: text goes in as text, never as HTML).

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}
export function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
export function short(id) { return id.length > 12 ? id.slice(0, 12) + "…" : id; }
export function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }
