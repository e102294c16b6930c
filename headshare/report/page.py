"""The report as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headshare report: {model}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; line-height: 1.4; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} .cap {{ font-size: 0.9em; color: #444; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.row {{ display: flex; gap: 1.5em; align-items: flex-start; }} .row img {{ max-width: 62%; }}
.row p {{ flex: 1; min-width: 16em; margin-top: 2em; }}
</style></head>
<body data-figures="{n_figs}" data-figures-loaded="pending">
<h1>headshare report: {model}</h1>
<p>{layers} layers &times; {heads} query heads ({kv} key/value heads); unit = {unit}.
Attention maps from {windows} windows of {window} tokens of <code>{text}</code>.
Similarity of two maps = {definition}.</p>
{body}
<script>
// marks the page once every figure has decoded, so a headless browser can tell loaded from broken
window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-figures-loaded", ok === imgs.length ? String(ok) : "broken:" + ok);
}});
</script>
</body></html>
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_page(data: dict, pngs: dict[str, bytes]) -> str:
    """One self-contained page: the figures embedded as base64 PNGs, captions and the key numbers."""
    s, lay, f, p, sc = data["summary"], data["layout"], data["focus"], data["plan"], data["scatter"]
    rows = "".join(
        f"<tr><td>{m}</td><td>{v['spearman']:.3f}</td><td>{v['spearman_abs']:.3f}</td>"
        f"<td>{v['map_similarity_of_weight_best_earlier']:.3f}</td></tr>"
        if "spearman" in v else f"<tr><td>{m}</td><td colspan=3>{html.escape(v['skipped'])}</td></tr>"
        for m, v in data["weight_vs_attention"].items())
    body = f"""
<h2>1. Layer-wise attention-map similarity</h2>
<div class="row">{_img(pngs["layers"], "layer-wise similarity heatmap")}
<p class="cap">Layer l against layer l' is the mean similarity of head (l, h) and head (l', h) over h, the
pairing that sharing whole layers imposes. Each row's red square is that layer's most similar other layer.
Best-match similarity of a layer: mean {s['layer_best_mean']:.3f}, median {s['layer_best_median']:.3f};
all layer pairs: mean {s['layer_pair_mean']:.3f}. Comparing the layers' mean maps instead (smoother, so
more alike) gives a best-match mean of {s['layer_mean_map_best_mean']:.3f}.</p></div>
<h2>2. Head-wise attention-map similarity</h2>
<div class="row">{_img(pngs["head"], "head-wise similarity grid")}
<p class="cap">Similarity of head ({f['head'][0]}, {f['head'][1]}) to every query head; circles mark its
top {f['top']} heads in other layers, which come from {f['distinct_layers']} different layers.
Best-match similarity of a head (any other layer): mean {s['head_best_mean']:.3f}, median
{s['head_best_median']:.3f}, against {s['layer_best_mean']:.3f} for whole layers; all head pairs in
different layers: mean {s['head_pair_mean']:.3f}. On average a head's top {f['top']} come from
{s['mean_distinct_layers_in_top']:.1f} layers.</p></div>
<h2>3. Does weight similarity predict attention-map similarity?</h2>
{_img(pngs["weights"], "weight vs attention-map similarity scatter")}
<p class="cap">Each point is a pair of query heads in different layers ({sc['pairs_drawn']:,} of
{sc['pairs_total']:,} drawn; correlations use all). The x axis is the paper's signed cosine; since a
head's q and k can both flip sign without changing its map, the rank correlation of |cosine| is given
too. The last column: each head takes its most weight-similar head in an earlier layer, as DirectShare
does; how similar are their attention maps, on average? Taking the most map-similar earlier head instead
gives {sc['map_similarity_of_map_best_earlier']:.3f}, an average earlier head
{sc['map_similarity_of_average_earlier_pair']:.3f}.</p>
<table><tr><th>match function</th><th>Spearman &rho;</th><th>&rho; of |cosine|</th><th>map similarity of weight-chosen earlier match</th></tr>
{rows}</table>
<h2>4. The sharing plan</h2>
<div class="row">{_img(pngs["plan"], "sharing plan grid")}
<p class="cap">Method <b>{html.escape(p['method'])}</b> at ratio {p['ratio']}: {p['units_shared']} of
{p['units_total']} units shared{f", {p['units_pruned']} pruned" if p['units_pruned'] else ""}; a shared cell
names the unit (layer.unit) whose weights it reads. Parameters {p['params_original']:,} &rarr;
{p['params_shared']:,}: {p['params_saved']:,} saved
({100 * p['params_saved'] / p['params_original']:.2f} % of the model).</p></div>
"""
    return _PAGE.format(model=html.escape(str(data["model"])), n_figs=len(pngs), layers=lay["num_layers"],
                        heads=lay["num_heads"], kv=lay["num_kv_heads"], unit=html.escape(data["unit"]),
                        windows=data["calibration"]["windows"], window=data["calibration"]["window"],
                        text=html.escape(data["calibration"]["text"]),
                        definition=data["definitions"]["attention_similarity"], body=body)

