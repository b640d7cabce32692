"""Test helpers: copy a BraTS 2018 tree into the BraTS 2021, BraTS 2023 and nnU-Net v2 raw
layouts (the same cases, images byte for byte, labels in each layout's own values), an
anisotropic, differently oriented variant, and an HCP tree into nnU-Net v2 raw.

Case ids keep the sorted order of the BraTS 2018 ids (``Brats18_…`` → ``BraTS2021_00000``, …), so
the seeded splits, which shuffle the *sorted* ids, draw the same cases in every layout. Each
converter returns ``{new id: BraTS 2018 id}``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from tmerge.data.labels import PAPER_CLASSES, aseg_to_paper

MODALITIES = ("t1", "t1ce", "t2", "flair")
TRAINING = "MICCAI_BraTS_2018_Data_Training"
VALIDATION = "MICCAI_BraTS_2018_Data_Validation"
#: BraTS 2018 value → nnU-Net value of nnU-Net's own BraTS conversion (1 edema, 2 NCR, 3 ET).
NNUNET_FROM_2018 = {0: 0, 2: 1, 1: 2, 4: 3}
#: nnU-Net channel order (the Decathlon's Task01): file index → BraTS 2018 modality.
NNUNET_CHANNELS = {0: "flair", 1: "t1", 2: "t1ce", 3: "t2"}
NNUNET_CHANNEL_NAMES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
NNUNET_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}


def brats2018_cases(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``(labelled, unlabelled)``: sorted BraTS 2018 id → case folder."""
    labelled = {
        d.name: d
        for grade in ("HGG", "LGG")
        for d in (root / TRAINING / grade).glob("*")
        if d.is_dir() and not d.name.startswith(".")
    }
    val = root / VALIDATION
    unlabelled = (
        {d.name: d for d in val.glob("*") if d.is_dir() and not d.name.startswith(".")}
        if val.is_dir()
        else {}
    )
    return dict(sorted(labelled.items())), dict(sorted(unlabelled.items()))


def _file(folder: Path, stem: str) -> Path:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(folder / stem)


def _relabel(src: Path, dst: Path, table: dict[int, int]) -> None:
    img = nib.load(src)
    data = np.asarray(img.dataobj)
    out = np.zeros_like(data)
    for a, b in table.items():
        out[data == a] = b
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, img.affine, img.header), dst)


def _ids(src: Path, labelled_name, unlabelled_name) -> dict[str, tuple[str, Path, bool]]:
    labelled, unlabelled = brats2018_cases(src)
    cases = {labelled_name(i): (old, folder, True) for i, (old, folder) in enumerate(labelled.items())}
    for i, (old, folder) in enumerate(unlabelled.items()):
        cases[unlabelled_name(i)] = (old, folder, False)
    return cases


def to_brats2021(src: Path, dst: Path) -> dict[str, str]:
    """``dst/BraTS2021_<NNNNN>/BraTS2021_<NNNNN>_{t1,t1ce,t2,flair[,seg]}.nii.gz``: unlabelled cases
    have no seg file."""
    cases = _ids(src, lambda i: f"BraTS2021_{i:05d}", lambda i: f"BraTS2021_{9000 + i:05d}")
    for new, (old, folder, labelled) in cases.items():
        out = dst / new
        out.mkdir(parents=True)
        for m in (*MODALITIES, "seg") if labelled else MODALITIES:
            shutil.copyfile(_file(folder, f"{old}_{m}"), out / f"{new}_{m}.nii.gz")
    return {new: old for new, (old, _, _) in cases.items()}


def to_brats2023(src: Path, dst: Path) -> dict[str, str]:
    """``dst/BraTS-GLI-<NNNNN>-000/BraTS-GLI-<NNNNN>-000-{t1n,t1c,t2w,t2f[,seg]}.nii.gz``, the seg
    with 3 for enhancing (2018's 4)."""
    names = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    cases = _ids(src, lambda i: f"BraTS-GLI-{i:05d}-000", lambda i: f"BraTS-GLI-{9000 + i:05d}-000")
    for new, (old, folder, labelled) in cases.items():
        out = dst / new
        out.mkdir(parents=True)
        for m in MODALITIES:
            shutil.copyfile(_file(folder, f"{old}_{m}"), out / f"{new}-{names[m]}.nii.gz")
        if labelled:
            _relabel(_file(folder, f"{old}_seg"), out / f"{new}-seg.nii.gz", {0: 0, 1: 1, 2: 2, 4: 3})
    return {new: old for new, (old, _, _) in cases.items()}


def write_dataset_json(dst: Path, channel_names: dict, labels: dict, n: int, **extra: object) -> Path:
    path = dst / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": n,
        "file_ending": ".nii.gz",
        **extra,
    }
    path.write_text(json.dumps(data, indent=2))
    return path


def to_nnunet(src: Path, dst: Path) -> dict[str, str]:
    """nnU-Net v2 raw as nnU-Net's own BraTS conversion writes it: channels in the Decathlon's
    order (FLAIR, T1w, t1gd, T2w), labels 1 edema / 2 NCR / 3 ET given as regions, unlabelled
    cases in ``imagesTs``."""
    cases = _ids(src, lambda i: f"BRATS_{i:03d}", lambda i: f"BRATS_{900 + i:03d}")
    n = 0
    for new, (old, folder, labelled) in cases.items():
        images = dst / ("imagesTr" if labelled else "imagesTs")
        images.mkdir(parents=True, exist_ok=True)
        for index, m in NNUNET_CHANNELS.items():
            shutil.copyfile(_file(folder, f"{old}_{m}"), images / f"{new}_{index:04d}.nii.gz")
        if labelled:
            _relabel(_file(folder, f"{old}_seg"), dst / "labelsTr" / f"{new}.nii.gz", NNUNET_FROM_2018)
            n += 1
    write_dataset_json(dst, NNUNET_CHANNEL_NAMES, NNUNET_REGIONS, n, regions_class_order=[1, 2, 3])
    return {new: old for new, (old, _, _) in cases.items()}


def anisotropic(src: Path, dst: Path) -> None:
    """Every NIfTI under ``src`` (any layout) copied to ``dst`` with every other slice of the
    last axis (twice its spacing) and the first axis flipped (RAS → LAS), affine to match."""
    for path in sorted(src.rglob("*")):
        out = dst / path.relative_to(src)
        if path.is_dir():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if not path.name.endswith((".nii.gz", ".nii")):
            shutil.copyfile(path, out)
            continue
        img = nib.load(path)
        data = np.asarray(img.dataobj)[::-1, :, ::2]
        m = np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], float)
        affine = img.affine @ m
        new = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        new.set_qform(affine, code=1)
        new.set_sform(affine, code=1)
        nib.save(new, out)


def hcp_to_nnunet(src: Path, dst: Path) -> dict[str, str]:
    """An HCP tree as nnU-Net v2 raw: channels T1, T2; labels the paper's 14 classes (aseg mapped),
    named as the paper names them. Case ``HCP_<subject>`` keeps the subjects' sorted order."""
    ids: dict[str, str] = {}
    for subject in sorted(d.name for d in src.iterdir() if (d / "T1w").is_dir()):
        folder, case = src / subject / "T1w", f"HCP_{subject}"
        (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
        for index, stem in enumerate(("T1w_acpc_dc_restore_brain", "T2w_acpc_dc_restore_brain")):
            shutil.copyfile(_file(folder, stem), dst / "imagesTr" / f"{case}_{index:04d}.nii.gz")
        aseg = nib.load(_file(folder, "aparc+aseg"))
        paper = aseg_to_paper(np.asarray(aseg.dataobj))
        (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(paper, aseg.affine), dst / "labelsTr" / f"{case}.nii.gz")
        ids[case] = subject
    labels = {"background": 0, **{name: i for i, name in enumerate(PAPER_CLASSES, start=1)}}
    write_dataset_json(dst, {"0": "T1", "1": "T2"}, labels, len(ids))
    return ids
