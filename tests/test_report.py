"""`headshare.report`: the analysis page of `headshare report`.

The numbers (ranks, weight vectors, attention-map similarity), a planted duplicate head found by
both weights and maps, the figures drawing exactly what report.json holds, the page rendering in
headless Chromium, and the CLI.
"""

import base64
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_CORPUS

from headshare.cli import main
from headshare.report import (
    attention_similarity,
    compute,
    cosine_matrix,
    head_weight_vectors,
    rankdata,
    report,
    spearman,
)

D = 8  # head_dim of the tiny models (hidden 32 / 4 heads)


@pytest.fixture
def text_file(tmp_path):
    # words the tiny tokenizer knows, in a fixed shuffled order so windows differ
    rng = np.random.default_rng(0)
    lines = [TINY_CORPUS[i] for i in rng.integers(0, len(TINY_CORPUS), size=60)]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(lines))
    return str(path)


@pytest.fixture(scope="session")
def planted_model(tiny_llama):
    """Factory: planted_model(layers=3) -> a tiny multi-head model whose head (2, 3) is an exact copy of head
    (0, 1).

    Weights alone make the copy exact; for the *maps* to match too, layer 2 must see nearly what layer 0
    sees, so every block's writes to the residual stream (o_proj, down_proj) are shrunk. q and k are
    scaled up so that maps are peaked and distinct heads are told apart (at init they are near uniform).
    """

    def build(layers: int = 3):
        model = tiny_llama(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
        torch.manual_seed(1)
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.q_proj.weight.normal_(0, 0.6)
                block.self_attn.k_proj.weight.normal_(0, 0.6)
                block.self_attn.o_proj.weight.mul_(1e-3)
                block.mlp.down_proj.weight.mul_(1e-3)
            src, dst = model.model.layers[0].self_attn, model.model.layers[2].self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(dst, name).weight[3 * D:4 * D] = getattr(src, name).weight[1 * D:2 * D]
            dst.o_proj.weight[:, 3 * D:4 * D] = src.o_proj.weight[:, 1 * D:2 * D]
        return model

    return build


# -- numbers ------------------------------------------------------------------------------------------------

def test_rankdata_averages_ties():
    assert rankdata(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata(np.array([3.0, 3.0, 3.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_hand_computed():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5  ->  rho = 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 3, 2, 4])) == pytest.approx(3 / np.sqrt(10), abs=1e-12)
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # any increasing map: rank correlation 1
    assert spearman(x, -x**3) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(5)))


def test_head_weight_vectors_follow_gqa_layout(tiny_llama):
    model = tiny_llama()  # 4 query heads reading 2 key/value heads
    attn = model.model.layers[1].self_attn
    q, k = head_weight_vectors(model, "q"), head_weight_vectors(model, "k")
    assert q.shape == (2 * 4, D * 32)
    for h in range(4):
        assert torch.equal(q[4 + h], attn.q_proj.weight[h * D:(h + 1) * D].flatten())
        # query heads 0, 1 read key/value head 0; 2, 3 read head 1 (transformers' repeat_kv order)
        assert torch.equal(k[4 + h], attn.k_proj.weight[(h // 2) * D:(h // 2 + 1) * D].flatten())
    ck = cosine_matrix(k)
    assert ck[4, 5] == pytest.approx(1.0) and ck[4, 6] < 0.5
    qk = head_weight_vectors(model, "qk")
    assert torch.equal(qk[4 + 3], torch.cat([q[4 + 3], k[4 + 3]]))


def test_attention_similarity_equals_brute_force(tiny_tokenizer, text_file, planted_model):
    from headshare.data import token_blocks

    model = planted_model()
    ids = token_blocks(tiny_tokenizer, open(text_file).read(), 12, max_blocks=3)
    S, S_mean = attention_similarity(model, ids, progress=False)
    assert model.config._attn_implementation == "sdpa"  # restored afterwards
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = [torch.cat([a[0] for a in model(w[None], output_attentions=True).attentions]).double()
                for w in ids]  # each (L*H, T, T)

    def row_cos(a, b):  # mean over query positions of the cosine of the two rows
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()

    for i, j in [(0, 0), (1, 11), (2, 7), (5, 9), (11, 3)]:
        want = torch.stack([row_cos(m[i], m[j]) for m in maps]).mean()
        assert S[i, j] == pytest.approx(float(want), abs=1e-6)
    for a, b in [(0, 2), (1, 2), (1, 1)]:
        want = torch.stack([row_cos(m.view(3, 4, 12, 12)[a].mean(0), m.view(3, 4, 12, 12)[b].mean(0))
                            for m in maps]).mean()
        assert S_mean[a, b] == pytest.approx(float(want), abs=1e-6)


def test_planted_duplicate_is_the_top_match(tiny_tokenizer, text_file, planted_model):
    model = planted_model()
    data, S = compute(model, tiny_tokenizer, text=text_file, windows=4, window=24, head=(2, 3), top=3,
                      ratio=0.25, progress=False)
    dup, orig = 2 * 4 + 3, 0 * 4 + 1
    best = data["heads"]["best"]
    assert (best[dup]["match_layer"], best[dup]["match_head"]) == (0, 1)
    assert (best[orig]["match_layer"], best[orig]["match_head"]) == (2, 3)
    assert best[dup]["similarity"] > 0.99
    others = [b["similarity"] for i, b in enumerate(best) if i not in (dup, orig)]
    assert max(others) < 0.9  # the copy stands out: the other heads are not all alike
    assert data["focus"]["matches"][0] == {"layer": 0, "head": 1, "similarity": best[dup]["similarity"]}
    for metric in ("q", "k", "v", "qk", "qkv"):
        W = cosine_matrix(head_weight_vectors(model, metric)).numpy()
        W[np.repeat(np.arange(3), 4)[:, None] == np.repeat(np.arange(3), 4)[None, :]] = -np.inf
        assert W[dup].argmax() == orig and W[dup, orig] == pytest.approx(1.0), metric
    # the paper's directshare shares the copy, reading the original's weights
    assert {"layer": 2, "unit": 3, "source_layer": 0, "source_unit": 1} in data["plan"]["sources"]
    assert np.allclose(S[dup], S[orig], atol=0.02)  # the copy relates to every head as the original does


# -- the written report --------------------------------------------------------------------------------------

@pytest.fixture
def tiny_report(tmp_path, tiny_tokenizer, text_file, planted_model):
    model = planted_model(layers=4)
    out = tmp_path / "report"
    return report(model, tiny_tokenizer, out, text=text_file, windows=3, window=16, ratio=0.25, top=4,
                  max_points=30, progress=False)


def test_report_json_holds_what_is_drawn(tiny_report):
    out = tiny_report.out
    data = json.loads((out / "report.json").read_text())
    figs = tiny_report.figures
    # 1. layers heatmap and its marks
    ax = figs["layers"].axes[0]
    assert np.array_equal(ax.images[0].get_array(), np.array(data["layers"]["matrix"]))
    marks = ax.collections[0].get_offsets()
    assert marks.tolist() == [[b["match"], b["layer"]] for b in data["layers"]["best"]]
    # 2. the chosen head's grid and its top matches
    ax = figs["head"].axes[0]
    assert np.array_equal(ax.images[0].get_array(), np.array(data["focus"]["grid"]))
    assert ax.collections[0].get_offsets().tolist() == [[m["head"], m["layer"]] for m in data["focus"]["matches"]]
    assert len(data["focus"]["matches"]) == 4
    # 3. one scatter per match function, with the points and the correlation of report.json
    axes = figs["weights"].axes
    assert [a.get_title().split(":")[0] for a in axes] == ["q", "k", "v", "qk", "qkv"]
    for a in axes:
        m = a.get_title().split(":")[0]
        w = data["weight_vs_attention"][m]
        pts = a.collections[0].get_offsets()
        assert np.array_equal(pts[:, 0], w["x"]) and np.array_equal(pts[:, 1], data["scatter"]["y"])
        assert f"{w['spearman']:.3f}" in a.get_title()
    assert data["scatter"]["pairs_drawn"] == 30 == len(data["scatter"]["y"])
    assert data["scatter"]["pairs_total"] == 16 * 15 // 2 - 4 * 6  # pairs of 16 heads in different layers
    # 4. the plan grid: 0.25 of 16 units = 4 shared, every one drawn with its source
    ax = figs["plan"].axes[0]
    state = np.array(data["plan"]["state"])
    assert np.array_equal(ax.images[0].get_array(), state)
    assert (state == 2).sum() == data["plan"]["units_shared"] == 4
    labels = sorted((t.get_position(), t.get_text()) for t in ax.texts)
    assert labels == sorted(((s["unit"], s["layer"]), f"{s['source_layer']}.{s['source_unit']}")
                            for s in data["plan"]["sources"])
    assert data["plan"]["params_saved"] == 4 * 4 * D * 32  # q, k, v rows and o columns of 4 heads
    # the full matrix beside it agrees with the drawn numbers
    S = np.load(out / "attention_similarity.npy")
    h = data["focus"]["head"]
    assert np.allclose(S[h[0] * 4 + h[1]].reshape(4, 4), data["focus"]["grid"], atol=1e-5)
    # the page embeds exactly the PNGs written beside it
    page = (out / "index.html").read_text()
    embedded = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded == [(out / f"{n}.png").read_bytes() for n in ("layers", "head", "weights", "plan")]


def _chromium() -> str:
    """The chromium binary; the test skips where none is installed (.ci/run installs Debian's package)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium is not installed (none of chromium, chromium-browser, google-chrome on PATH); "
                "install it to run this test, e.g. apt-get install -y chromium, as .ci/run does")


def _run_chromium(binary: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(tiny_report, tmp_path):
    import matplotlib.image

    binary = _chromium()
    page = (tiny_report.out / "index.html").resolve().as_uri()
    dom = _run_chromium(binary, tmp_path, "--dump-dom", page).stdout
    # the page's own script counts images that decoded (complete and naturalWidth > 0)
    assert 'data-figures-loaded="4"' in dom, dom[-500:]

    # the same check tells a broken image apart: it must be able to fail
    broken = tmp_path / "broken.html"
    broken.write_text((tiny_report.out / "index.html").read_text().replace(
        "data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    dom = _run_chromium(binary, tmp_path, "--dump-dom", broken.resolve().as_uri()).stdout
    assert 'data-figures-loaded="broken:3"' in dom

    shot = tmp_path / "shot.png"
    _run_chromium(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", page)
    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (1600, 1200)
    # figures are colourful (viridis heatmap), text and a broken-image icon are not
    saturation = img.max(-1) - img.min(-1)
    assert (saturation > 0.3).mean() > 0.02, "no coloured pixels: the figures did not render"
    assert img.std() > 0.1


# -- command line --------------------------------------------------------------------------------------------

def test_cli_report(tmp_path, text_file, capsys, tiny_checkpoint, planted_model):
    model_dir = tiny_checkpoint(tmp_path / "model", planted_model())
    out = tmp_path / "rep"
    argv = ["report", str(model_dir), "--text", text_file, "--ratio", "0.25", "--out", str(out),
            "--windows", "2", "--window", "16", "--head", "2,3", "--top", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve() / "index.html")
    data = json.loads((out / "report.json").read_text())
    assert data["focus"]["head"] == [2, 3] and data["focus"]["matches"][0]["layer"] == 0
    assert data["calibration"] == {"text": text_file, "windows": 2, "window": 16, "tokens": 32}
    assert {p.name for p in out.iterdir()} == {"index.html", "report.json", "attention_similarity.npy",
                                               "layers.png", "head.png", "weights.png", "plan.png"}
    assert main(argv) == 2  # existing output is refused ...
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0  # ... unless forced
    assert main([*argv[:-4], "--head", "7,0", "--force"]) == 2
    assert "outside this model's 3 layers x 4 heads" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_report(smollm2_dir, tmp_path):
    """The real model end to end, short: GQA (9 query heads on 3 key/value heads) and a 30 x 3 unit plan."""
    out = tmp_path / "smol"
    cmd = [sys.executable, "-m", "headshare.cli", "report", str(smollm2_dir), "--ratio", "0.3", "--out", str(out),
           "--windows", "1", "--window", "64"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    data = json.loads((out / "report.json").read_text())
    assert np.array(data["layers"]["matrix"]).shape == (30, 30)
    assert np.array(data["focus"]["grid"]).shape == (30, 9) and data["focus"]["head"] == [29, 0]
    assert data["plan"]["units_shared"] == 27 and np.array(data["plan"]["state"]).shape == (30, 3)
    assert data["plan"]["params_saved"] == 27 * (3 * 64 + 64 + 64 + 3 * 64) * 576
    assert data["scatter"]["pairs_total"] == 270 * 269 // 2 - 30 * 36
    for m, w in data["weight_vs_attention"].items():
        assert -1 <= w["spearman"] <= 1, m
