"""The report's own files, under its folder: every name ``tmerge report`` writes is spelt here
(the run folders' files: :mod:`tmerge.runs`). A leaf, so that the report's package and each of
its sections can name the files without importing one another."""

from __future__ import annotations

#: The default report folder under the runs root.
REPORT_DIR = "report"
REPORT_MD = "report.md"
TABLE2_MD = "table2.md"
TABLE2_CSV = "table2.csv"
TABLE3_MD = "table3.md"
CURVES_MD = "curves.md"
PREMISE_MD = "premise.md"
FIG_CURVES = "fig_curves.png"
ENDPOINTS_MD = "endpoints.md"
ENDPOINTS_CSV = "endpoints.csv"
STATS_MD = "stats.md"
STATS_CSV = "stats.csv"
FIG3_EXAMPLES = "fig3_examples.png"
FIG4_PAIRED = "fig4_paired.png"
FIG5_ALPHAS = "fig5_alphas.png"
FIG5_TRAJECTORY = "fig5_alpha_trajectory.png"
