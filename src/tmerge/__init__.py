"""tmerge: T-IMM (Transfer Incremental Mode Matching) as a PyTorch Lightning framework.

Geyer, Corinzia & Wegmayr (2019), "Transfer Learning by Adaptive Merging of Multiple Models".
"""

__version__ = "0.1.0"
