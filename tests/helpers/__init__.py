"""Helpers the tests share, importable as ``helpers.<module>`` (``tests`` is on pytest's
``pythonpath``; see pyproject.toml):

- :mod:`helpers.tiny_settings`: the tiny network and schedule of the end-to-end tests;
- :mod:`helpers.anatomy`: skip where the embedded default data's anatomy package is missing;
- :mod:`helpers.trees`: small HCP and BraTS 2018 trees in the real datasets' layouts;
- :mod:`helpers.layouts`: those trees converted to the other layouts (BraTS 2021/2023, nnU-Net);
- :mod:`helpers.sources`: source run folders (weights, Fisher) without training;
- :mod:`helpers.imports`: the import graph of ``src/tmerge`` (for the layering test);
- :mod:`helpers.fisher_ddp_worker`, :mod:`helpers.slurm_requeue_worker`: scripts that tests run
  as subprocesses (and import, for their model and data).
"""
