"""``tmerge bench``: the project's fast paths against their references, side by side in one process.

Five sections, each timed after ``warmup`` untimed steps (compilation, cuDNN autotuning):

* ``step``: one training step (forward, loss, backward, Adam) of the default network at the
  patch size, plain PyTorch eager float32 against the project's default fast path (the
  precision and ``torch.compile`` that ``TrainerConfig``'s ``"auto"`` resolves to: bf16
  autocast + compile + cuDNN autotuning on CUDA; eager float32 on CPU, where the two coincide).
* ``lightning``: the Lightning training loop with the project's ``SegmentationModule`` on
  batches already on the device, against the bare fast step: the loop's overhead.
* ``data``: the same loop fed by the real patch pipeline (``PatchDataset``: in-memory volumes,
  random crops, augmentation, the project's loader settings) against on-device batches; the
  pipeline keeps up when the ratio is ≥ 0.9.
* ``fisher``: seconds per volume of the empirical Fisher by the per-sample loop and by the
  batched path (``vmap``), plus the compiled loop on a GPU, and whether they agree.
* ``adaption``: the T-IMM adaption step (:class:`~tmerge.merge.AdaptiveMerge`: eq. 2 merge in
  every forward) against the plain training step.

Every section uses the project's own pieces: its loss and module as the stages build them
(:mod:`tmerge.bench.workload`), Lightning's precision plugins, the CLI's config composition.
Peak memory is measured for each: allocated CUDA memory on a GPU, the process's resident set
(sampled) on CPU (:mod:`tmerge.bench.timing`). Results go to ``<out_dir>`` as JSON
(:data:`tmerge.bench.run.RESULTS_JSON`, rewritten after each section, so an interrupted run keeps
what it measured) and Markdown
(:mod:`tmerge.bench.table`); the table is also printed. docs/benchmarks.md has the keys, the
measured numbers and the GPU recipe.

Example:
    tmerge bench                                   # CPU: 64³ in ≤ 2 minutes; GPU: 128³, batch 2
    tmerge bench patch_size=32 iters=2 skip=[data]
    tmerge bench --show-config                     # every key
"""

from tmerge.bench.run import run_bench
from tmerge.bench.settings import FISHER_METHODS, SECTIONS, BenchConfig, Resolved, resolve
from tmerge.bench.table import format_table
from tmerge.bench.timing import PeakMemory, time_steps

__all__ = [
    "FISHER_METHODS",
    "SECTIONS",
    "BenchConfig",
    "PeakMemory",
    "Resolved",
    "format_table",
    "resolve",
    "run_bench",
    "time_steps",
]
