"""`headshare report`: the paper's similarity analysis ("Why heads") for any model, as a page to look at.

The report answers, for one model, whether the paper's premise holds before anything is shared:

1. Layer-wise attention-map similarity: are whole layers' attention maps alike? (The paper: rarely.)
2. Head-wise attention-map similarity: for one chosen head, its most similar heads anywhere in the
   network. (The paper: often alike, and spread over many layers.)
3. Weight similarity per match function (q, k, v, qk, qkv) against attention-map similarity over all
   pairs of heads in different layers: a scatter plot and the Spearman rank correlation. (The paper:
   weights predict maps, so heads can be matched without data.)
4. The sharing plan at the given ratio and method on the layers x units grid, and the parameters saved.

Definitions (our choices; the paper leaves them open):
- Heads are *query heads*, the paper's L x H attention maps; head index = layer * H + h. With grouped-
  query attention a unit (what `headshare.share` moves) is one key/value head with its H/K query heads,
  so units are coarser than heads: the head-wise panels show query heads with thin lines between units,
  the plan panel shows units. Weight vectors are built per query head: its own W_q rows, and the W_k /
  W_v rows of the key/value head it reads, so two query heads of one unit have k and v cosine 1.
  With multi-query attention the single key/value head belongs to no unit and k, v (and the k, v parts
  of qk, qkv) are left out, as in `headshare.similarity`.
- Attention-map similarity of two maps A, B (T x T, causal, rows sum to 1) on one window is the mean over
  query positions t of cos(A[t], B[t]); it is averaged over the calibration windows. Row-wise cosine
  keeps the first, trivially identical rows (position 0 attends only to itself) from dominating as
  they would in one cosine of the flattened maps.
- A layer's map is its H head maps in head order, so layer similarity is the mean over h of the
  similarity of head (l, h) with head (l', h): exactly the pairing that sharing a whole layer (ALBERT-
  style) imposes, and the cosine of the flattened (H, T, T) tensors of row-normalised maps. The report
  also gives a second, gentler definition, the similarity of the layers' mean maps (the mean over
  heads, itself row-stochastic); averaging smooths maps, so it rates layers as more alike.
- "Best match" of a head or layer is the most similar one in any *other* layer, so layers and heads are
  compared on the same footing.

Memory stays bounded: each window's maps are row-normalised, their causal lower triangles gathered into
one (heads, T(T+1)/2) matrix and multiplied into a running (heads x heads) Gram; no map outlives its
window. Peak extra memory is about 2.5 x L x H x T^2 floats, those of one window.

Modules, one step each: `attention` (map similarity), `weights` (per-head weight vectors), `stats`
(ranks, cosines), `analysis` (the numbers of each panel, `compute`), `figures`, `page` (the HTML) and
`output` (writing the files, `report`).

>>> from headshare.report import report, write
>>> result = report(model, tokenizer, "report/", ratio=0.3)   # doctest: +SKIP
>>> result.data["weight_vs_attention"]["qk"]["spearman"]      # doctest: +SKIP
>>> write(json.load(open("report/report.json")), "report2/")  # redraw from the numbers  # doctest: +SKIP
"""

from .analysis import MAX_SCATTER_POINTS, compute
from .attention import attention_similarity
from .figures import figures
from .output import Report, report, write
from .page import html_page
from .stats import cosine_matrix, rankdata, spearman
from .weights import head_weight_vectors

__all__ = [
    "MAX_SCATTER_POINTS", "Report", "attention_similarity", "compute", "cosine_matrix", "figures",
    "head_weight_vectors", "html_page", "rankdata", "report", "spearman", "write",
]
