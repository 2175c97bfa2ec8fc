"""``fedscan site check``: a hospital's pre-flight check before its SuperNode joins.

An IT person runs it on the folder they will hand to ``flower-supernode`` as
``data-path``. It answers three questions without training anything: will
fedscan read this folder (counts, unreadable files and why, odd files that are
read but altered), is the data sound (duplicates, one image under two labels,
modalities that do not fit the domain), and how long will a round take on this
machine. It reads the folder exactly as the ClientApp will (same listing, same
decoder, same fingerprint cache), so a clean check means a clean first round.

No patient tag is read into the report: DICOM headers are opened for modality,
size and bit depth only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedscan.common.core.errors import DataError
from fedscan.common.core.parallel import pmap
from fedscan.common.data.classes import CLASSES, canonical_class
from fedscan.common.data.datasets._layout import assemble
from fedscan.common.data.datasets.base import ImageCollection, list_images
from fedscan.common.data.dicom import domain_window, looks_like_dicom
from fedscan.common.data.fingerprint import Fingerprints, compute_fingerprints
from fedscan.common.data.grouping import exact_duplicate_groups
from fedscan.common.data.imageio import read_gray, resize_gray

log = logging.getLogger("fedscan.sitecheck")

# Below this a site cannot hold out its own validation split by groups and its
# update is mostly noise; the check calls such a site unusable.
MIN_IMAGES = 20
SMALL_SIDE = 64  # pixels; smaller scans are upscaled into blur
# The modality each domain's classifier was trained on; another one is almost
# certainly a wrong export (an MR series in a lung-CT folder).
DOMAIN_MODALITY = {"brain_mri": "MR", "lung_ct": "CT"}


@dataclass(frozen=True)
class FileInfo:
    """What the header says about one readable file; ``notes`` are alterations on read."""

    kind: str  # JPEG, PNG, BMP, ... or DICOM
    modality: str  # DICOM Modality, '' for plain images
    notes: tuple[str, ...]


def inspect_file(path: Path) -> FileInfo:
    """Header-level facts about ``path`` (call only on files that decode)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if looks_like_dicom(head, path.name):
        import pydicom

        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["Modality", "BitsStored", "NumberOfFrames", "PhotometricInterpretation"],
        )
        notes = []
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            notes.append(f"multi-frame ({int(ds.NumberOfFrames)} frames): the middle one is used")
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            notes.append("MONOCHROME1: inverted on read")
        return FileInfo("DICOM", str(ds.get("Modality", "")).upper(), tuple(notes))
    with Image.open(path) as img:
        notes = []
        suffix = path.suffix.lower().lstrip(".")
        named = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}.get(suffix)
        if named and img.format != named:
            notes.append(f"content is {img.format} but the file is named .{suffix}")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            notes.append("alpha channel: transparent pixels become black")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            notes.append("16-bit: rescaled to 8 bits per image (min..max)")
        if min(img.size) < SMALL_SIDE:
            notes.append(f"very small ({img.width}x{img.height}): upscaled")
        if img.mode in ("RGB", "RGBA", "P"):
            small = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int16)
            coloured = (np.abs(small - small.mean(axis=2, keepdims=True)).max(axis=2) > 24).mean()
            if coloured > 0.3:
                notes.append("colour image: a photo or screenshot, not a grayscale scan?")
            elif coloured > 0:
                notes.append(
                    "coloured marks (annotation or watermark text?) on a grayscale scan: "
                    "a model can learn them as a shortcut"
                )
        return FileInfo(str(img.format), "", tuple(notes))


def _inspect(path: Path) -> FileInfo | str:
    try:
        return inspect_file(path)
    except (OSError, UnidentifiedImageError, ValueError) as exc:  # decoded once, so rare
        return f"header unreadable: {exc}"
    except Exception as exc:  # pydicom raises its own types on odd headers
        return f"header unreadable: {type(exc).__name__}"


def _domain_of(folders: list[Path], domain: str | None) -> str:
    """The given domain, else the one whose class names the most sub-folders match."""
    if domain is not None:
        return domain
    scores = {
        d: sum(canonical_class(d, f.name) is not None for f in folders) for d in sorted(CLASSES)
    }
    return max(scores, key=lambda d: scores[d])


def survey_layout(
    path: Path, domain: str | None
) -> tuple[ImageCollection | None, list[dict[str, Any]]]:
    """Read the ``<class>/`` layout in one pass, naming everything that is off.

    Findings (``path``, ``what``, ``blocking``): a sub-folder that is no class of
    the domain (or one of another domain's), two folders for one class, an empty
    class folder, a symbolic link to a folder (not followed: a loop or a mount
    would be read twice or forever), files at the top level (ignored). The
    collection holds the recognised class folders' images (``None`` when none).
    """
    if not path.is_dir():
        raise DataError(path, "site data folder does not exist or is not a folder")
    findings: list[dict[str, Any]] = []

    def find(p: Path, what: str, blocking: bool) -> None:
        rel = p.relative_to(path).as_posix() if p != path else "."
        findings.append({"path": rel, "what": what, "blocking": blocking})

    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    links = [p for p in entries if p.is_symlink() and p.is_dir()]
    folders = [p for p in entries if p.is_dir() and p not in links]
    domain = _domain_of(folders, domain)
    if domain not in CLASSES:
        raise DataError(path, f"domain '{domain}' is not one of {sorted(CLASSES)}")
    classes = CLASSES[domain]
    found: dict[str, Path] = {}
    for sub in folders:
        cls = canonical_class(domain, sub.name)
        if cls is None:
            other = [
                f"{d} class '{canonical_class(d, sub.name)}'"
                for d in sorted(CLASSES)
                if d != domain and canonical_class(d, sub.name) is not None
            ]
            what = (
                f"a folder of another domain ({other[0]}) in a {domain} site"
                if other
                else f"not a {domain} class folder (expected {', '.join(classes)})"
            )
            find(sub, what + ": rename it or move it out of the site folder", True)
        elif cls in found:
            find(sub, f"a second folder for class '{cls}' (first: {found[cls].name})", True)
        else:
            found[cls] = sub
    for p in links:
        find(p, "a symbolic link to a folder: not followed (a loop or a mount?)", False)
    for p in entries:
        if p.is_file():
            find(p, "a file at the top level, outside any class folder: ignored", False)
    rows: list[tuple[Path, str, str | None]] = []
    skipped: list[Path] = []
    for cls, sub in found.items():
        images, other = list_images(sub)
        for q in sorted(sub.rglob("*")):
            if q.is_symlink() and q.is_dir():
                find(q, "a symbolic link to a folder: not followed (a loop or a mount?)", False)
        # training reads class folders recursively: images in a sub-folder of one (an old
        # export, a DICOM series) count as that class; name each, do not count silently
        nested = Counter(sub / q.relative_to(sub).parts[0] for q in images if q.parent != sub)
        for folder, n in sorted(nested.items()):
            find(
                folder,
                f"a sub-folder inside class folder '{cls}': its {n} image(s) are read as {cls} "
                "(move it out of the site folder if they are not)",
                False,
            )
        if not images:
            find(sub, f"class folder '{cls}' holds no JPEG, PNG or DICOM file", False)
        rows += [(q, cls, None) for q in images]
        skipped += other
    if not found:
        find(path, f"no class folders; expected folders named {', '.join(classes)}", True)
    if not rows:
        return None, findings
    collection = assemble(
        name="site", domain=domain, classes=classes, root=path, rows=rows, skipped=skipped
    )
    return collection, findings


def _problems(
    c: ImageCollection,
    fp: Fingerprints,
    modalities: Counter,
    conflicts: list[list[int]],
    on_unreadable: str,
) -> list[str]:
    """Reasons the site cannot join as it is; empty when it can."""
    out = []
    n_ok = int(fp.readable.sum())
    if n_ok == 0:
        out.append("no readable image in the folder")
    elif n_ok < MIN_IMAGES:
        out.append(f"only {n_ok} readable images; a site needs at least {MIN_IMAGES}")
    n_bad = int((~fp.readable).sum())
    if n_bad and on_unreadable == "error":
        out.append(
            f"{n_bad} unreadable file(s): training stops on them "
            "(remove or fix them, or set dataset.on_unreadable=skip)"
        )
    if conflicts:
        out.append(
            f"{len(conflicts)} image(s) stored under two different classes: "
            "a labelling error to fix before training"
        )
    expected = DOMAIN_MODALITY[c.domain]
    wrong = {m: n for m, n in modalities.items() if m and m != expected}
    if wrong:
        listing = ", ".join(f"{n} {m}" for m, n in sorted(wrong.items()))
        out.append(f"{listing} DICOM file(s) in a {c.domain} site (expected {expected})")
    return out


def site_check(
    path: Path,
    *,
    cache_root: Path,
    domain: str | None = None,
    on_unreadable: str = "error",
    estimate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The pre-flight report for one site folder (see the module docstring).

    ``estimate``: a resolved config to time a round with (its model, image size,
    batch size and local epochs); ``None`` skips the timing.
    """
    c, findings = survey_layout(path, domain)
    if c is None:  # nothing to read: the findings are the report
        return _layout_only_report(path, domain, findings)
    log.info(
        "site check: %d files in %d class folders (%s); decoding each once ...",
        len(c),
        len(set(c.labels.tolist())),
        c.domain,
    )
    fp = compute_fingerprints(c, cache_root)
    rel = [c.relpath(i) for i in range(len(c))]
    ok = np.flatnonzero(fp.readable)
    inspected = pmap(_inspect, [c.paths[i] for i in ok], desc="inspect")
    infos = dict(zip(ok.tolist(), inspected, strict=True))
    kinds = Counter(i.kind for i in infos.values() if isinstance(i, FileInfo))
    modalities = Counter(i.modality for i in infos.values() if isinstance(i, FileInfo))
    notes = [
        {"path": rel[i], "note": note}
        for i, info in infos.items()
        for note in (info.notes if isinstance(info, FileInfo) else (info,))
    ]
    groups = exact_duplicate_groups(fp)
    conflicts = [g for g in groups if len({int(c.labels[i]) for i in g}) > 1]
    sizes = Counter(f"{fp.width[i]}x{fp.height[i]}" for i in ok)
    report: dict[str, Any] = {
        "path": str(c.root),
        "domain": c.domain,
        "files": len(c),
        "readable": len(ok),
        "classes": c.class_counts(ok),
        "unreadable": [
            {"path": rel[i], "reason": str(fp.error[i])} for i in np.flatnonzero(~fp.readable)
        ],
        "non_image_files": [p.relative_to(c.root).as_posix() for p in c.skipped],
        "formats": dict(kinds.most_common()),
        "modalities": {m: n for m, n in modalities.most_common() if m},
        "notes": notes,
        "exact_duplicate_groups": [[rel[i] for i in g] for g in groups],
        "label_conflicts": [[rel[i] for i in g] for g in conflicts],
        "image_sizes": dict(sizes.most_common()),
    }
    empty = [k for k, n in report["classes"].items() if n == 0]
    report["warnings"] = (
        [f"no images of class {', '.join(empty)}: fine for federation, but say so"] if empty else []
    )
    report["layout"] = findings
    report["warnings"] += [f"{f['path']}: {f['what']}" for f in findings if not f["blocking"]]
    report["problems"] = [f"{f['path']}: {f['what']}" for f in findings if f["blocking"]]
    report["problems"] += _problems(c, fp, modalities, conflicts, on_unreadable)
    report["usable"] = not report["problems"]
    if estimate is not None and len(ok):
        report["estimate"] = estimate_round(c, ok, estimate)
    return report


def domain_of_folder(path: Path) -> str:
    """The domain whose class names the most sub-folders of ``path`` match (the one
    :func:`survey_layout` assumes when none is given); ``brain_mri`` for a folder that
    does not exist (the check itself then names it)."""
    entries = sorted(path.iterdir()) if path.is_dir() else []
    folders = [p for p in entries if p.is_dir() and not p.is_symlink()]
    return _domain_of([f for f in folders if not f.name.startswith(".")], None)


def _layout_only_report(
    path: Path, domain: str | None, findings: list[dict[str, Any]]
) -> dict[str, Any]:
    """The report of a folder with no readable class folder: its layout findings."""
    problems = [f"{f['path']}: {f['what']}" for f in findings if f["blocking"]]
    if not problems:
        problems = ["no JPEG, PNG or DICOM file in any class folder"]
    return {
        "path": str(path),
        "domain": domain or "unknown",
        "files": 0,
        "readable": 0,
        "classes": {},
        "unreadable": [],
        "non_image_files": [],
        "formats": {},
        "modalities": {},
        "notes": [],
        "exact_duplicate_groups": [],
        "label_conflicts": [],
        "image_sizes": {},
        "layout": findings,
        "warnings": [f"{f['path']}: {f['what']}" for f in findings if not f["blocking"]],
        "problems": problems,
        "usable": False,
    }


def estimate_round(c: ImageCollection, ok: np.ndarray, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Seconds per federated round on this machine, from timed steps of the real model.

    Times a few forward/backward steps at the configured size and batch, and the
    decode of a sample of the site's own files, then scales by the site's counts.
    """
    import torch

    from fedscan.common.core.settings import from_section
    from fedscan.common.federated.settings import FederationSettings
    from fedscan.common.learn.models import build_model
    from fedscan.common.learn.training import (
        autocast,
        place_model,
        prefix_autocast,
        prefix_dtype,
        select_device,
    )

    device = select_device(str(cfg["device"]), cfg.get("num_threads"))
    size = int(cfg["dataset"]["image_size"])
    batch = int(cfg["train"]["batch_size"])
    fed = from_section(FederationSettings, cfg["federation"], "federation")
    epochs, val_fraction = fed.local_epochs, fed.site_val_fraction
    started = time.perf_counter()
    model = place_model(build_model(cfg["model"], len(c.classes)), device)
    log.info(
        "site check: %s built in %.1f s; timing training steps at %d px, batch %d ...",
        model.name,
        time.perf_counter() - started,
        size,
        batch,
    )
    cut = model.frozen_until if cfg["model"].get("feature_cache", False) else 0
    precision = cfg["model"].get("prefix_precision", "auto")

    sample = ok[np.linspace(0, len(ok) - 1, min(8, len(ok))).astype(int)]
    window = domain_window(c.domain)
    t0 = time.perf_counter()
    images = [resize_gray(read_gray(c.paths[i], ct_window=window), size) for i in sample]
    decode_s = (time.perf_counter() - t0) / len(sample)

    x = torch.from_numpy(np.stack([images[i % len(images)] for i in range(batch)]))
    x = (x.float() / 255.0).unsqueeze(1).to(device)
    t_trunk = 0.0
    with torch.inference_mode():
        if cut:
            model.eval()
            t0 = time.perf_counter()
            with prefix_autocast(device, prefix_dtype(device, str(precision))):
                x = model.forward_until(x, cut).float()
            t_trunk = (time.perf_counter() - t0) / batch
    x = x.clone()
    y = torch.zeros(batch, dtype=torch.long, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model.forward_from(x, cut).float(), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    model.train()
    warm = step()  # warm-up: allocator and kernel selection
    log.info("site check: warm-up step %.1f s; two timed steps ...", warm)
    train_s = min(step() for _ in range(2)) / batch
    with torch.inference_mode():
        model.eval()
        t = time.perf_counter()
        model.forward_from(x, cut)
        eval_s = (time.perf_counter() - t) / batch
    log.info("site check: timing done in %.1f s", time.perf_counter() - started)
    n = len(ok)
    n_val = round(n * val_fraction)
    per_round = (n - n_val) * epochs * train_s + n_val * eval_s
    first_extra = n * (decode_s + t_trunk)
    return {
        "device": str(device),
        "model": model.name,
        "mode": str(cfg["model"].get("mode", "")),
        "feature_cache": bool(cut),
        "image_size": size,
        "batch_size": batch,
        "local_epochs": epochs,
        "train_samples": n - n_val,
        "val_samples": n_val,
        "seconds_per_round": float(f"{per_round:.3g}"),
        "first_round_extra_seconds": float(f"{first_extra:.3g}"),
        "note": "timed on synthetic steps of this model on this machine; the first round "
        "also decodes every file" + (" and caches the frozen trunk's features" if cut else ""),
    }


def format_site_report(r: Mapping[str, Any]) -> str:
    """The check as a few lines an IT person reads top to bottom, verdict first."""
    verdict = "READY to join" if r["usable"] else "NOT READY"
    lines = [f"site check of {r['path']} ({r['domain']}): {verdict}"]
    lines += [f"  PROBLEM: {p}" for p in r["problems"]]
    lines += [f"  warning: {w}" for w in r["warnings"]]
    lines.append(f"  files: {r['files']} ({r['readable']} readable)")
    lines.append("  classes: " + ", ".join(f"{k} {v}" for k, v in r["classes"].items()))
    lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in r["formats"].items()))
    if r["modalities"]:
        mods = ", ".join(f"{k} {v}" for k, v in r["modalities"].items())
        lines.append(f"  DICOM modalities: {mods}")
    lines.append(
        "  image sizes: " + ", ".join(f"{k} x{v}" for k, v in list(r["image_sizes"].items())[:6])
    )
    if r["unreadable"]:
        lines.append(f"  unreadable: {len(r['unreadable'])}")
        lines += [f"    {u['path']}: {u['reason']}" for u in r["unreadable"][:30]]
    if r["notes"]:
        lines.append(f"  read with changes: {len(r['notes'])}")
        lines += [f"    {n['path']}: {n['note']}" for n in r["notes"][:30]]
    if r["non_image_files"]:
        lines.append(f"  ignored (not JPEG/PNG/DICOM): {', '.join(r['non_image_files'][:10])}")
    n_rm = sum(len(g) - 1 for g in r["exact_duplicate_groups"])
    lines.append(
        f"  exact-duplicate groups: {len(r['exact_duplicate_groups'])} ({n_rm} redundant files), "
        f"{len(r['label_conflicts'])} under two classes"
    )
    for g in r["label_conflicts"][:10]:
        lines.append(f"    same image: {' = '.join(g)}")
    e = r.get("estimate")
    if e:
        lines.append(
            f"  estimate on {e['device']} ({e['model']} {e['mode']}, {e['image_size']} px, "
            f"batch {e['batch_size']}, {e['local_epochs']} local epoch(s), "
            f"{e['train_samples']} train / {e['val_samples']} val): "
            f"~{e['seconds_per_round']:.3g} s per round, first round "
            f"+{e['first_round_extra_seconds']:.3g} s"
        )
    return "\n".join(lines)
