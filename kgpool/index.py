"""The index page at `/`: every endpoint with a try-it form, and the live pool status."""

from __future__ import annotations

from html import escape

from .notebook import Notebook

# The header tells kgpool a call comes from this page (kgpool/cookies.py: with a token
# configured, the cookie authenticates such calls).
_SCRIPT = """
const PAGE = {'X-Kgpool-Page': '1'};
const statusBox = document.querySelector('[data-pool-status]');
async function refresh() {
  try {
    const r = await fetch('_kgpool/readyz', {cache: 'no-store', headers: PAGE});
    const s = await r.json();
    const k = s.kernels;
    statusBox.textContent = `${s.status}: ${k.idle} idle, ${k.busy} busy, ` +
      `${k.starting} starting of ${k.desired} kernels; ${s.queued} queued`;
  } catch (e) { statusBox.textContent = 'status unavailable: ' + e; }
}
refresh(); setInterval(refresh, 2000);
for (const button of document.querySelectorAll('[data-try]')) {
  button.addEventListener('click', async () => {
    const box = button.closest('[data-endpoint]');
    const [method, template] = box.dataset.endpoint.split(' ');
    let path = template.split('/').map(part => {
      const at = part.indexOf(':');
      if (at < 0) return part;
      const input = box.querySelector(`input[name="${part.slice(at + 1)}"]`);
      return part.slice(0, at) + encodeURIComponent(input.value);
    }).join('/');
    const query = box.querySelector('input[name="_query"]').value;
    if (query) path += '?' + query.replace(/^[?]/, '');
    const body = box.querySelector('textarea');
    const init = {method, headers: {...PAGE}};
    if (body && body.value) {
      init.body = body.value;
      init.headers['Content-Type'] = box.querySelector('select').value;
    }
    const out = box.querySelector('[data-result]');
    out.textContent = '...';
    try {
      const r = await fetch(path.replace(/^[/]/, ''), init);
      out.textContent = `${r.status} ${r.headers.get('Content-Type') || ''}\\n` + await r.text();
    } catch (e) { out.textContent = 'failed: ' + e; }
  });
}
"""

_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem}
section.ep{border:1px solid #ccc;border-radius:6px;padding:.6rem .9rem;margin:.7rem 0}
code.m{font-weight:bold;margin-right:.5rem} pre{background:#f5f5f5;padding:.5rem;
white-space:pre-wrap;max-height:20rem;overflow:auto} input,textarea{margin:.2rem .4rem .2rem 0}
textarea{width:100%;height:4rem} .status{padding:.4rem .7rem;background:#eef;border-radius:4px}
.warnings{background:#fff4e5;border-left:4px solid #f0a030;padding:.4rem 1.6rem}
"""


def render_index(served: list[tuple[str, str, Notebook]], details: bool = True) -> str:
    """HTML for (name, prefix, notebook) triples; paths are relative so a proxy prefix works.
    The warnings quote cells: without `details` only their number is shown."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>kgpool</title>",
             f"<style>{_STYLE}</style></head><body><main data-kgpool-index>",
             "<h1>kgpool</h1><p class='status' data-pool-status>loading pool status…</p>"]
    for name, prefix, notebook in served:
        parts.append(f"<h2>{escape(name)} <small>{escape(prefix or '/')}</small></h2>")
        if notebook.warnings and details:
            parts.append("<ul class='warnings' data-warnings>" + "".join(
                f"<li>{escape(w)}</li>" for w in notebook.warnings) + "</ul>")
        elif notebook.warnings:
            parts.append(f"<p class='warnings' data-warnings>{len(notebook.warnings)} "
                         "warning(s) about this notebook's cells: the server log has them "
                         "(and this page, with a token configured)</p>")
        for ep in notebook.endpoints:
            full = prefix + ep.path
            label = escape(f"{ep.method} {full}", quote=True)
            inputs = "".join(
                f"<label>{escape(p)} <input name='{escape(p, quote=True)}' required></label>"
                for p in ep.params)
            body = "" if ep.method == "GET" else (
                "<select><option>application/json</option><option>text/plain</option>"
                "<option>application/x-www-form-urlencoded</option></select>"
                "<textarea placeholder='request body'></textarea>")
            parts.append(
                f"<section class='ep' data-endpoint='{label}'><code class='m'>"
                f"{escape(ep.method)}</code><code>{escape(full)}</code> "
                f"<small>cells {', '.join(map(str, ep.cells))}</small><div>{inputs}"
                f"<label>query <input name='_query' placeholder='a=1&amp;b=2'></label>"
                f"{body}<button type='button' data-try>Try it</button></div>"
                f"<pre data-result></pre></section>")
    parts.append(f"</main><script>{_SCRIPT}</script></body></html>")
    return "".join(parts)
