"""How alike two models are, key by key and block by block, as numbers, tables and pictures.

- :func:`compare_models`: cosine similarity, relative L2 distance and norms of two checkpoints per
  key, per block and per component, streamed (one tensor of each at a time);
- :func:`compare_merge`: the same, plus how much of B a merge of A and B holds, per key and block;
- :func:`render_chart`: a bar chart or heatmap of the block rows (Pillow);
- :func:`element_rows`, :func:`metadata_view`, :func:`recipe_lines`: what a file's header says.

Example:
    >>> from mergers.analysis import compare_models, render_chart
    >>> result = compare_models("a.safetensors", "b.safetensors")
    >>> render_chart(result, "cosine").save("a_vs_b.png")
"""

from mergers.analysis.chart import CHARTS, render_chart
from mergers.analysis.compare import BY, Comparison, compare_merge, compare_models, csv_text
from mergers.analysis.inspect import ELEMENT_HEADERS, element_rows, metadata_view, recipe_lines

__all__ = [
    "BY",
    "CHARTS",
    "ELEMENT_HEADERS",
    "Comparison",
    "compare_merge",
    "compare_models",
    "csv_text",
    "element_rows",
    "metadata_view",
    "recipe_lines",
    "render_chart",
]
