"""The disk plan's invariants (docs/library.md, "The disk plan"), each proved on a library laid out as
A1111 + ComfyUI (with an extra_model_paths.yaml folder) + folders outside every UI (out/, Downloads/).

Oracles are independent of the code under test: the ``safetensors`` library and ``torch.load`` load what
each UI name holds before and after; the size of every distinct inode under the library is summed before
and after to measure what was really freed; ``os.stat`` tells hard links and symlinks apart.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fakes.library_files import half, pruned, tensors, write_ckpt, write_st
from fakes.sample_files import make_model
from safetensors import safe_open
from safetensors.torch import load_file

from ckptlab.errors import FormatError, MismatchError
from ckptlab.library.apply_plan import apply_plan
from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import find_dupes, plan_space
from ckptlab.library.plan import SpacePlan
from ckptlab.library.scanner import scan

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
UNET = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
VAE = "first_stage_model.decoder.conv_in.weight"


def sd1(seed: int, ema: bool = False) -> dict[str, torch.Tensor]:
    return tensors("sd1_checkpoint", seed=seed, ema=ema, dim_cap=8)


class Lib:
    def __init__(self, root: Path):
        self.root = root
        self.sd = root / "webui" / "models" / "Stable-diffusion"
        self.lora = root / "webui" / "models" / "Lora"
        self.hyper = root / "webui" / "models" / "hypernetworks"
        self.esrgan = root / "webui" / "models" / "ESRGAN"
        self.ck = root / "ComfyUI" / "models" / "checkpoints"
        self.cl = root / "ComfyUI" / "models" / "loras"
        self.extra = root / "shared-store" / "sd"  # a UI folder only through extra_model_paths.yaml
        self.out = root / "out"
        self.dl = root / "Downloads"
        self.yaml = root / "extra_model_paths.yaml"
        self.db = root / "catalog.db"

    @property
    def ui_folders(self) -> list[Path]:
        return [self.sd, self.lora, self.hyper, self.esrgan, self.ck, self.cl, self.extra]

    def scan(self) -> None:
        with Catalog(self.db) as cat:
            scan([self.root / "webui", self.root / "ComfyUI", self.out, self.dl], cat, hash=True, fingerprint=True,
                 extra_model_paths=self.yaml, workers=1)

    def plan(self, **kw) -> SpacePlan:
        with Catalog(self.db) as cat:
            return plan_space(cat, **kw)


@pytest.fixture
def lib(tmp_path) -> Lib:
    L = Lib(tmp_path / "lib")
    for d in (L.sd, L.lora, L.hyper, L.esrgan, L.ck, L.cl, L.extra, L.out, L.dl):
        d.mkdir(parents=True)
    L.yaml.write_text(f"store:\n  base_path: {L.root / 'shared-store'}\n  checkpoints: sd\n")
    # mA: the same bytes in A1111, ComfyUI and Downloads/
    write_st(L.sd / "mA.safetensors", pruned(sd1(1)))
    shutil.copy2(L.sd / "mA.safetensors", L.ck / "mA.safetensors")
    shutil.copy2(L.sd / "mA.safetensors", L.dl / "mA.safetensors")
    # mB: one model in three forms: a full fp16 pickle (A1111), pruned fp32 (ComfyUI), pruned fp16 (out/)
    b = sd1(2, ema=True)
    write_ckpt(L.sd / "mB.ckpt", half(b))
    write_st(L.ck / "mB.safetensors", pruned(b))
    write_st(L.out / "mB.safetensors", half(pruned(b)))
    # mC: the same bytes in A1111 and in the extra_model_paths folder
    write_st(L.extra / "mC.safetensors", sd1(3, ema=True))
    shutil.copy2(L.extra / "mC.safetensors", L.sd / "mC.safetensors")
    # mD: fp32 with EMA, alone in A1111 -> prune + fp16 in place (VAE stays fp32)
    write_st(L.sd / "mD.safetensors", sd1(4, ema=True))
    # mE: fp32 named -fp32 outside every UI -> fp16, renamed -fp16; mF: the same inside a UI -> untouched
    write_st(L.out / "mE-fp32.safetensors", pruned(sd1(5)))
    write_st(L.sd / "mF-fp32.safetensors", pruned(sd1(6)))
    # mG: an fp32 file and its existing fp16 copy, both in A1111
    write_st(L.sd / "mG.safetensors", pruned(sd1(7)))
    write_st(L.sd / "mG-fp16.safetensors", half(pruned(sd1(7))))
    # already pruned fp16: nothing to do
    write_st(L.sd / "done.safetensors", half(pruned(sd1(8))))
    # a LoRA in both UIs; a hypernetwork and an ESRGAN model (pickles their UIs load only as .pt / .pth)
    make_model(L.lora / "style.safetensors", "sd1_kohya_lora", dtype="F16")
    shutil.copy2(L.lora / "style.safetensors", L.cl / "style.safetensors")
    make_model(L.hyper / "anime.pt", "sd1_hypernetwork")
    make_model(L.esrgan / "x4.pth", "esrgan_x4")
    L.scan()
    return L


def load_any(path: Path) -> dict[str, torch.Tensor]:
    """What a UI gets from a name: safetensors' own loader, or torch.load (weights only) for pickles."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, o) -> None:  # hypernetworks and ESRGAN pickles nest their tensors
        if isinstance(o, torch.Tensor):
            flat[prefix] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(f"{prefix}.{i}", v)

    walk("", obj)
    return flat


def ui_models(lib: Lib) -> dict[tuple[Path, str], dict[str, torch.Tensor]]:
    """(UI folder, model stem) -> the tensors the UI loads, EMA left out, floats rounded to fp16."""
    out = {}
    for folder in lib.ui_folders:
        for p in folder.iterdir():
            if p.suffix in MODEL_SUFFIXES and not p.name.startswith("."):
                sd = load_any(p)
                out[(folder, p.stem)] = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()
                                         if not k.startswith("model_ema")}
    return out


def disk_bytes(root: Path) -> int:
    """Bytes of every distinct inode under ``root`` (hard links counted once, symlinks as nothing)."""
    seen, total = set(), 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if os.path.islink(os.path.join(dirpath, n)) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if n.startswith("catalog.db"):
                continue
            st = os.lstat(p)
            out[p] = (st.st_ino, st.st_size, st.st_mtime_ns, os.path.islink(p))
    return out


def in_ui(lib: Lib, path: str) -> bool:
    return any(Path(path).parent == f for f in lib.ui_folders)


# -- No model leaves a UI ---------------------------------------------------------------------------------------

def test_no_model_leaves_a_ui(lib, cli):
    before = ui_models(lib)
    plan = lib.plan()
    assert plan.steps, "the library has duplicates and fp32 files: the plan cannot be empty"
    plan.save(lib.root / "plan.json")
    r = cli("apply-plan", lib.root / "plan.json", "--db", lib.db)
    assert r.returncode == 0, r.stdout + r.stderr
    after = ui_models(lib)
    assert set(after) == set(before)  # every (UI folder, name) is still there
    for key, sd in before.items():
        got = after[key]
        assert set(got) == set(sd), key  # the same tensors (EMA aside) ...
        for k, v in sd.items():
            assert torch.equal(got[k], v), (key, k)  # ... with the same values (at fp16 rounding)


def test_links_replace_ui_copies(lib):
    lib.plan().save(lib.root / "plan.json")
    apply_plan(lib.root / "plan.json", catalog_path=lib.db)
    same = lambda a, b: os.stat(a).st_ino == os.stat(b).st_ino  # noqa: E731
    pairs = [(lib.sd / "mA.safetensors", lib.ck / "mA.safetensors"),
             (lib.sd / "mC.safetensors", lib.extra / "mC.safetensors"),
             (lib.lora / "style.safetensors", lib.cl / "style.safetensors")]
    for a, b in pairs:  # hard links on one filesystem
        assert same(a, b) and not a.is_symlink() and not b.is_symlink(), (a, b)
    # the A1111 pickle of mB is now its stem with the kept copy's suffix, linked to the kept copy
    assert not (lib.sd / "mB.ckpt").exists() and same(lib.sd / "mB.safetensors", lib.ck / "mB.safetensors")
    # the rescan after apply-plan keeps the extra_model_paths folder a UI folder for the next plan
    with Catalog(lib.db) as cat:
        assert {r.folder for r in cat.files() if Path(r.path).parent == lib.extra} == {"checkpoints"}


def test_link_sym_and_none(lib):
    plan = lib.plan(link="sym")
    plan.save(lib.root / "plan.json")
    apply_plan(lib.root / "plan.json", catalog_path=lib.db)
    ui_dups = [s for s in plan.steps if s.action == "link_duplicate"]
    assert ui_dups and all(s.link == "sym" for s in ui_dups)
    for s in ui_dups:
        p = Path(s.link_path)
        assert p.is_symlink() and os.path.samefile(p, s.keep)

    lib2 = Lib(lib.root)  # --link none: removing from a UI only when asked for exactly that
    lib2.db = lib.root / "second.db"
    lib2.scan()
    none = lib2.plan(link="none")
    assert not any(s.action == "link_duplicate" for s in none.steps)


def test_hard_link_across_filesystems_is_never_attempted(lib, monkeypatch):
    """``--link hard`` on files of different devices leaves the copy alone instead of failing later;
    ``auto`` makes a symlink there."""
    import dataclasses

    from ckptlab.library import hub_queries

    real = hub_queries.record_of

    def record_of(row):  # ComfyUI's folder on another device (find_dupes streams its records through record_of)
        r = real(row)
        return dataclasses.replace(r, dev=r.dev + 1) if r.path.startswith(str(lib.ck)) else r

    monkeypatch.setattr(hub_queries, "record_of", record_of)
    with Catalog(lib.db) as cat:
        res = find_dupes(cat, link="hard")
        auto = find_dupes(cat)
    a = next(g for g in res.groups if any(c.path == str(lib.ck / "mA.safetensors") for c in g.copies))
    c = next(c for c in a.copies if c.path == str(lib.ck / "mA.safetensors"))
    assert c.action == "leave" and "another filesystem" in c.note
    a = next(g for g in auto.groups if any(c.path == str(lib.ck / "mA.safetensors") for c in g.copies))
    assert next(c for c in a.copies if c.path == str(lib.ck / "mA.safetensors")).link == "sym"


# -- A copy inside a UI folder is kept over one outside ----------------------------------------------------------

def test_ui_copy_kept_over_outside(lib):
    plan = lib.plan()
    steps = {s.path: s for s in plan.steps}
    assert steps[str(lib.dl / "mA.safetensors")].action == "delete_duplicate"
    assert in_ui(lib, steps[str(lib.dl / "mA.safetensors")].keep)
    # out/mB is safetensors and pruned - a better form than the A1111 pickle - but it is outside every UI
    assert steps[str(lib.out / "mB.safetensors")].action == "delete_duplicate"
    assert in_ui(lib, steps[str(lib.out / "mB.safetensors")].keep)
    for s in plan.steps:
        if s.action in ("delete_duplicate", "link_duplicate"):
            assert in_ui(lib, s.keep)
            assert (s.action == "link_duplicate") == in_ui(lib, s.path), s


# -- One consistent plan -------------------------------------------------------------------------------------------

def test_one_keeper_per_group_and_groups_never_contradict(lib):
    with Catalog(lib.db) as cat:
        res = find_dupes(cat)
    seen: set[str] = set()
    for g in res.groups:
        keepers = [c for c in g.copies if c.keep]
        assert len(keepers) == 1 and keepers[0].path == g.keep
        paths = {c.path for c in g.copies}
        assert not (paths & seen), "a file in two groups"
        seen |= paths
    # mB's three forms are one group (fingerprint), not an exact group plus a same_weights group
    mb = [g for g in res.groups if str(lib.ck / "mB.safetensors") in {c.path for c in g.copies}]
    assert len(mb) == 1 and {c.path for c in mb[0].copies} == {
        str(lib.sd / "mB.ckpt"), str(lib.ck / "mB.safetensors"), str(lib.out / "mB.safetensors")}


def test_plan_is_consistent_and_ordered(lib):
    plan = lib.plan()
    keepers = {s.keep for s in plan.steps if s.keep}
    subjects = [s.path for s in plan.steps]
    assert len(subjects) == len(set(subjects))
    assert not keepers & {s.path for s in plan.steps if s.action != "transform"}
    kinds = [s.action == "transform" for s in plan.steps]
    assert kinds == sorted(kinds)  # every duplicate step before every transform
    groups = {}
    for s in plan.steps:
        if s.group is not None:
            groups.setdefault(s.group, set()).add(s.keep)
    assert all(len(k) == 1 for k in groups.values())


def test_forged_plan_deleting_a_keeper_is_refused(lib, cli):
    plan = lib.plan()
    obj = plan.to_dict()
    dup = next(s for s in obj["steps"] if s["action"] == "delete_duplicate")
    evil = dict(dup, path=dup["keep"], keep=dup["path"])  # a second step removing the first one's keeper
    obj["steps"].insert(1, evil)
    (lib.root / "evil.json").write_text(json.dumps(obj))
    before = tree(lib.root)
    r = cli("apply-plan", lib.root / "evil.json", "--db", lib.db)
    assert r.returncode == 1 and "keeps" in r.stderr and "Traceback" not in r.stderr
    assert tree(lib.root) == before
    with pytest.raises(FormatError):
        SpacePlan.load(lib.root / "evil.json")


def _replace_keeping_stat(path: Path, data_from: Path) -> None:
    """Put other content at ``path`` with the same size and mtime (what a size+mtime check cannot see)."""
    st = path.stat()
    data = bytearray(data_from.read_bytes())
    assert len(data) == st.st_size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_keeper_replaced_after_planning_is_never_trusted_exact(lib):
    plan = lib.plan()
    step = next(s for s in plan.steps if s.path == str(lib.dl / "mA.safetensors"))
    keep = Path(step.keep)
    plan.save(lib.root / "plan.json")
    data = bytearray(keep.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (lib.root / "tampered").write_bytes(bytes(data))
    _replace_keeping_stat(keep, lib.root / "tampered")
    results = {str(r.path): r for r in apply_plan(lib.root / "plan.json", catalog_path=lib.db, rescan=False)}
    r = results[str(lib.dl / "mA.safetensors")]
    assert r.status == "failed" and "sha256 recomputed" in r.message
    assert (lib.dl / "mA.safetensors").exists()


def test_keeper_replaced_after_planning_is_never_trusted_same_weights(lib):
    plan = lib.plan()
    step = next(s for s in plan.steps if s.path == str(lib.out / "mB.safetensors"))
    assert step.match == "fingerprint"
    keep = Path(step.keep)
    plan.save(lib.root / "plan.json")
    other = write_st(lib.root / "other.safetensors", pruned(sd1(99, ema=True)))  # other weights, same layout
    _replace_keeping_stat(keep, other)
    for dry in (True, False):
        results = {str(r.path): r for r in apply_plan(lib.root / "plan.json", catalog_path=lib.db, rescan=False,
                                                      dry_run=dry)}
        r = results[str(lib.out / "mB.safetensors")]
        assert r.status == "failed" and "fingerprint recomputed" in r.message
        assert (lib.out / "mB.safetensors").exists() and (lib.sd / "mB.ckpt").exists()


def test_missing_or_changed_keeper(lib):
    plan = lib.plan()
    plan.save(lib.root / "plan.json")
    step = next(s for s in plan.steps if s.path == str(lib.dl / "mA.safetensors"))
    os.utime(step.keep, ns=(0, 10**18))  # touched after planning
    from ckptlab.library.apply_plan import verify_keeper

    with pytest.raises(MismatchError, match="changed since the plan"):
        verify_keeper(step)
    Path(step.keep).rename(lib.root / "gone")
    with pytest.raises(MismatchError, match="does not exist"):
        verify_keeper(step)


# -- idempotent, re-runnable after a crash, dry run = real run ------------------------------------------------

def test_dry_run_is_exactly_the_real_run(lib):
    plan = lib.plan()
    plan.save(lib.root / "plan.json")
    before = tree(lib.root)
    dry = apply_plan(lib.root / "plan.json", catalog_path=lib.db, dry_run=True)
    assert tree(lib.root) == before  # nothing touched
    real = apply_plan(lib.root / "plan.json", catalog_path=lib.db)
    assert [(r.action, r.path, r.new_path) for r in dry] == [(r.action, r.path, r.new_path) for r in real]
    assert [r.status for r in dry] == ["would-do"] * len(dry) and [r.status for r in real] == ["done"] * len(real)
    assert [r.bytes_freed for r in dry] == [r.bytes_freed for r in real]


def test_idempotent_and_rerun_after_a_crash(lib):
    plan = lib.plan()
    plan.save(lib.root / "plan.json")
    # a crash before the step that links mB.ckpt under its new name: the same plan cut short there
    renamed = next(s for s in plan.steps if s.link_path and s.link_path != s.path)
    cut = plan.steps.index(renamed)
    assert cut > 0
    half_plan = SpacePlan(steps=plan.steps[:cut], catalog=plan.catalog)
    half_plan.save(lib.root / "half.json")
    first = apply_plan(lib.root / "half.json", catalog_path=lib.db)
    assert all(r.status == "done" for r in first)
    # and a transform that died mid-write left its hidden temporary behind
    t = next(s for s in plan.steps if s.action == "transform")
    from ckptlab.library.apply_plan import hidden_target

    hidden_target(Path(t.output)).write_bytes(b"half a file")
    # and a link under a new name was made but the old name not yet removed (mB.ckpt -> mB.safetensors)
    os.link(renamed.keep, renamed.link_path)
    again = apply_plan(lib.root / "plan.json", catalog_path=lib.db)
    assert not Path(renamed.path).exists() and os.path.samefile(renamed.link_path, renamed.keep)
    n = len(first)
    assert [r.status for r in again[:n]] == ["done-before"] * n
    assert all(r.status == "done" for r in again[n:]), [(r.path, r.message) for r in again[n:]]
    assert not hidden_target(Path(t.output)).exists()
    state = tree(lib.root)
    third = apply_plan(lib.root / "plan.json", catalog_path=lib.db)
    assert all(r.status == "done-before" for r in third), [(r.path, r.status, r.message) for r in third]
    assert tree(lib.root) == state
    assert lib.plan().steps == []  # and a new plan finds nothing left to do


# -- Estimates equal outcomes ----------------------------------------------------------------------------------

def test_estimates_equal_outcomes(lib, cli):
    plan = lib.plan()
    plan.save(lib.root / "plan.json")
    on_disk = disk_bytes(lib.root)
    r = cli("apply-plan", lib.root / "plan.json", "--db", lib.db, "--json", "--no-rescan")
    assert r.returncode == 0, r.stderr
    results = [json.loads(x) for x in r.stdout.splitlines()]
    for x in results:
        assert x["status"] == "done"
        assert x["bytes_planned"] > 0
        assert abs(x["bytes_freed"] - x["bytes_planned"]) <= x["bytes_planned"] / 100, x
    freed = on_disk - disk_bytes(lib.root)  # measured, not reported
    assert abs(freed - plan.total_bytes_freed) <= plan.total_bytes_freed / 100
    assert freed == sum(x["bytes_freed"] for x in results)


def test_fp16_keeps_the_vae_fp32_and_bills_it_so(lib):
    plan = lib.plan()
    step = next(s for s in plan.steps if s.path == str(lib.sd / "mD.safetensors"))
    assert step.ops == ["prune", "to_fp16"] and step.output == step.path
    size = (lib.sd / "mD.safetensors").stat().st_size
    plan.save(lib.root / "plan.json")
    apply_plan(lib.root / "plan.json", catalog_path=lib.db, rescan=False)
    with safe_open(str(lib.sd / "mD.safetensors"), "pt") as f:
        assert f.get_slice(VAE).get_dtype() == "F32" and f.get_slice(UNET).get_dtype() == "F16"
        assert not any(k.startswith("model_ema") for k in f.keys())
    assert size - (lib.sd / "mD.safetensors").stat().st_size == step.bytes_freed


def test_no_op_steps_are_never_proposed(lib):
    plan = lib.plan()
    paths = {s.path for s in plan.steps}
    assert str(lib.sd / "done.safetensors") not in paths  # already pruned fp16
    assert all(s.bytes_freed > 0 for s in plan.steps)
    # a tiny fp32 file where the rewrite's header would eat the saving: not proposed
    write_st(lib.out / "tiny.safetensors", {UNET: torch.randn(2, 2)})
    lib.scan()
    assert str(lib.out / "tiny.safetensors") not in {s.path for s in lib.plan().steps}


# -- Only conversions a UI can load; names say what files hold ------------------------------------------------

def test_pickles_a_ui_loads_only_as_pickles_stay(lib):
    plan = lib.plan()
    paths = {s.path for s in plan.steps}
    assert str(lib.hyper / "anime.pt") not in paths and str(lib.esrgan / "x4.pth") not in paths
    assert any("anime.pt: stays a pickle" in n for n in plan.notes)
    asked = lib.plan(convert_kinds={"hypernetwork"})
    step = next(s for s in asked.steps if s.path == str(lib.hyper / "anime.pt"))
    assert step.ops[0] == "convert_pickle" and step.output == str(lib.hyper / "anime.safetensors")
    assert str(lib.esrgan / "x4.pth") not in {s.path for s in asked.steps}


def test_converted_files_are_named_for_what_they_hold(lib):
    plan = lib.plan()
    steps = {s.path: s for s in plan.steps}
    e = steps[str(lib.out / "mE-fp32.safetensors")]
    assert e.ops == ["to_fp16"] and e.output == str(lib.out / "mE-fp16.safetensors")
    assert str(lib.sd / "mF-fp32.safetensors") not in steps  # renaming would take it from its UI
    # mG: the fp32 file and its fp16 copy: the fp16 copy is not removed, the fp32 one not converted
    assert str(lib.sd / "mG.safetensors") not in steps and str(lib.sd / "mG-fp16.safetensors") not in steps
    plan.save(lib.root / "plan.json")
    apply_plan(lib.root / "plan.json", catalog_path=lib.db)
    for folder in (lib.out, *lib.ui_folders):
        for p in folder.glob("*.safetensors"):
            with safe_open(str(p), "pt") as f:
                dtype = f.get_slice(UNET).get_dtype() if UNET in f.keys() else None
            if "-fp32" in p.stem:
                assert dtype == "F32", p
            if "-fp16" in p.stem:
                assert dtype == "F16", p
    assert not (lib.out / "mE-fp32.safetensors").exists() and (lib.out / "mE-fp16.safetensors").exists()


# -- diffusers folders --------------------------------------------------------------------------------------

def test_diffusers_folder_matches_its_single_file(tmp_path):
    from ckptlab.library.fingerprint import fingerprint_file
    from ckptlab.ops.diffusers_io import to_diffusers

    models = tmp_path / "webui" / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    (tmp_path / "out").mkdir()
    src = make_model(models / "sd15.safetensors", "sd1_checkpoint", dtype="F16")
    to_diffusers(src, tmp_path / "out" / "sd15-diffusers")
    to_diffusers(src, tmp_path / "out" / "sd15-fp32-diffusers", precision="fp32")
    want = fingerprint_file(src)
    assert fingerprint_file(tmp_path / "out" / "sd15-diffusers") == want
    assert fingerprint_file(tmp_path / "out" / "sd15-fp32-diffusers").fingerprint == want.fingerprint
    with Catalog(tmp_path / "c.db") as cat:
        scan([tmp_path / "webui", tmp_path / "out"], cat, hash=True, fingerprint=True)
        (g,) = find_dupes(cat).groups
        plan = plan_space(cat)
    assert g.keep == str(src) and g.kind == "same_weights" and "diffusers folder" in g.reason
    assert {c.action for c in g.copies if not c.keep} == {"leave"}
    assert plan.steps == []  # a folder is never removed


# -- CLI -------------------------------------------------------------------------------------------------

def test_cli_plan_space_output_and_apply_plan_db(lib, cli):
    out = lib.root / "plan.json"
    out.write_text("my notes")
    r = cli("plan-space", "-o", out, "--db", lib.db)
    assert r.returncode == 1 and "already exists" in r.stderr and out.read_text() == "my notes"
    r = cli("plan-space", "-o", out, "--overwrite", "--db", lib.db)
    assert r.returncode == 0, r.stderr
    assert SpacePlan.load(out).steps
    for line in r.stdout.splitlines():  # sizes in IEC units only
        assert not any(f" {u}" in line for u in ("KB", "MB", "GB")), line
    assert "KiB" in r.stdout or "MiB" in r.stdout
    r = cli("apply-plan", "--help")
    assert "--db" in r.stdout and "--catalog" not in r.stdout
    r = cli("apply-plan", out, "--catalog", lib.db, "--dry-run")  # the old spelling still works
    assert r.returncode == 0 and "would-do" in r.stdout
    r = cli("dupes", "--db", lib.db)
    assert r.returncode == 0 and "link  " in r.stdout and "remove" in r.stdout
    assert all(len(line) < 400 for line in r.stdout.splitlines()) and not any(
        line.startswith(("KiB", "MiB")) for line in r.stdout.splitlines())  # never hard-wrapped


def test_a_pickle_not_called_safe_is_never_kept(lib, monkeypatch):
    """A suspicious (or unchecked) pickle is in no group: it is neither the kept copy others are
    removed for, nor removed for another."""
    with Catalog(lib.db) as cat:  # the verdict in the catalog itself: dupes selects its candidates in SQL
        with cat.transaction():
            cat.conn.execute("UPDATE files SET safety = 'suspicious' WHERE display = ?", (str(lib.sd / "mB.ckpt"),))
        assert cat.get_by_path(lib.sd / "mB.ckpt").safety == "suspicious"
        groups = find_dupes(cat).groups
        plan = plan_space(cat)
    assert str(lib.sd / "mB.ckpt") not in {c.path for g in groups for c in g.copies}
    dups = [s for s in plan.steps if s.action != "transform"]
    assert str(lib.sd / "mB.ckpt") not in {s.path for s in dups} | {s.keep for s in dups}
    # (a transform of it would check the file itself again: run_each refuses pickles check does not call safe)


@pytest.mark.parametrize("change", [
    {"keep": 5}, {"mtime_ns": "soon"}, {"link_path": "/elsewhere/x.safetensors"}, {"link_path": "../x.safetensors"},
    {"output": "/etc/x.safetensors"}, {"output": None}, {"ops": ["rm"]}, {"match": "md5"}, {"keep_size": None}])
def test_forged_steps_are_refused_with_one_line(change, tmp_path, cli):
    """A hand-edited plan cannot make apply-plan write outside a step's own folder or crash."""
    base = {"dup": {"action": "link_duplicate", "path": "/m/a/x.safetensors", "size": 1, "bytes_freed": 1,
                    "sha256": "AA", "keep": "/m/b/x.safetensors", "keep_size": 1, "keep_sha256": "AA",
                    "match": "sha256", "link": "hard", "link_path": "/m/a/x.safetensors"},
            "transform": {"action": "transform", "path": "/m/a/y.ckpt", "size": 1, "bytes_freed": 1,
                          "ops": ["convert_pickle"], "output": "/m/a/y.safetensors"}}
    which = "transform" if set(change) & {"output", "ops"} else "dup"
    step = dict(base[which], **change)
    if change.get("link_path", "").startswith(".."):
        step["link_path"] = "/m/a/../x.safetensors"
    obj = {"format": "ckptlab-space-plan", "version": 2, "steps": [step]}
    with pytest.raises(FormatError):
        SpacePlan.from_dict(obj)
    (tmp_path / "p.json").write_text(json.dumps(obj))
    r = cli("apply-plan", tmp_path / "p.json", "--db", tmp_path / "c.db")
    assert r.returncode == 1 and r.stderr.startswith("ckptlab: error:") and len(r.stderr.splitlines()) == 1



# -- links are never rewritten through, and their targets never rewritten -------------------------------------

def _physical_set(root: Path) -> set[tuple[int, int]]:
    """(dev, inode) of every file a symlink under ``root`` resolves to (os.stat follows the link)."""
    out = set()
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.islink(p) and os.path.exists(p):
                st = os.stat(p)
                out.add((st.st_dev, st.st_ino))
    return out


def _dangling(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _s, ns in os.walk(root) for n in ns
            if os.path.islink(os.path.join(d, n)) and not os.path.exists(os.path.join(d, n))]


def test_second_plan_never_rewrites_what_symlinks_point_to(lib):
    """After a ``--link sym`` plan is applied and the library re-scanned, the next plan must not convert,
    prune or fp16 the kept copies the symlinks resolve to (their links would dangle or change)."""
    lib.plan(link="sym").save(lib.root / "plan.json")
    apply_plan(lib.root / "plan.json", catalog_path=lib.db)
    lib.scan()
    targets = _physical_set(lib.root)
    assert targets, "the sym plan made symlinks"
    second = lib.plan()
    for s in second.steps:
        if s.action == "transform":
            assert not os.path.islink(s.path), s.path
            st = os.stat(s.path)
            assert (st.st_dev, st.st_ino) not in targets, s.path
    second.save(lib.root / "plan2.json")
    apply_plan(lib.root / "plan2.json", catalog_path=lib.db)
    assert _dangling(lib.root) == []


def test_hand_made_symlink_target_is_never_rewritten(lib):
    """A symlink a person made in a UI folder, pointing at a model another UI keeps: the model stays."""
    target = lib.sd / "mD.safetensors"  # fp32 with EMA: plan-space would prune + fp16 it in place
    assert any(s.path == str(target) for s in lib.plan().steps)
    os.symlink(target, lib.ck / "mD.safetensors")
    lib.scan()
    plan = lib.plan()
    assert str(target) not in {s.path for s in plan.steps}
    assert str(lib.ck / "mD.safetensors") not in {s.path for s in plan.steps}
    assert any("symlink" in n and str(target) in n for n in plan.notes)


def test_apply_plan_refuses_to_transform_through_a_symlink(lib):
    """A transform step whose path is a symlink (a hand-edited or stale plan) is refused, the target kept."""
    target = lib.sd / "mD.safetensors"
    plan = lib.plan()
    step = next(s for s in plan.steps if s.path == str(target))
    before = target.read_bytes()
    link = lib.ck / "mD.safetensors"
    os.symlink(target, link)
    import dataclasses

    plan.steps = [dataclasses.replace(step, path=str(link), output=str(link))]
    plan.save(lib.root / "p.json")
    (r,) = apply_plan(lib.root / "p.json", catalog_path=lib.db, rescan=False)
    assert r.status == "failed" and "symlink" in r.message
    assert link.is_symlink() and target.read_bytes() == before


# -- apply-plan re-verifies the duplicate too ------------------------------------------------------------------

def test_duplicate_changed_after_planning_is_not_removed(lib):
    """A ``same sha256`` duplicate whose bytes changed after plan-space (mtime restored) is another file
    now: hashlib says so, and apply-plan must not replace it by a link to the kept copy."""
    import hashlib

    plan = lib.plan()
    step = next(s for s in plan.steps if s.path == str(lib.ck / "mA.safetensors"))
    assert step.action == "link_duplicate" and step.match == "sha256"
    plan.save(lib.root / "plan.json")
    dup = Path(step.path)
    data = bytearray(dup.read_bytes())
    data[-1] ^= 1
    (lib.root / "edited").write_bytes(bytes(data))
    _replace_keeping_stat(dup, lib.root / "edited")
    assert hashlib.sha256(dup.read_bytes()).hexdigest().upper() != step.sha256.upper()
    for dry in (True, False):
        results = {str(r.path): r for r in apply_plan(lib.root / "plan.json", catalog_path=lib.db, rescan=False,
                                                      dry_run=dry)}
        r = results[str(dup)]
        assert r.status == "failed" and "sha256 recomputed" in r.message
        assert not dup.is_symlink() and dup.read_bytes() == bytes(data) and dup.stat().st_nlink == 1
    assert results[str(lib.dl / "mA.safetensors")].status == "done"  # the rest ran


def test_hand_edited_step_cannot_delete_an_unrelated_file(lib):
    """A ``delete_duplicate`` step pointed at a 15-byte text file (its real size and mtime filled in)
    must not delete it: it is not the catalogued duplicate, and its size cannot match the kept copy's."""
    obj = lib.plan().to_dict()
    i = next(i for i, s in enumerate(obj["steps"]) if s["path"] == str(lib.dl / "mA.safetensors"))
    notes = lib.out / "notes.txt"
    notes.write_text("my own notes!!\n")
    st = notes.stat()
    assert st.st_size == 15
    obj["steps"][i] = dict(obj["steps"][i], path=str(notes), size=st.st_size, mtime_ns=st.st_mtime_ns,
                           bytes_freed=st.st_size)
    (lib.root / "edited.json").write_text(json.dumps(obj))
    results = {str(r.path): r for r in apply_plan(lib.root / "edited.json", catalog_path=lib.db, rescan=False)}
    assert results[str(notes)].status == "failed"
    assert notes.read_text() == "my own notes!!\n"
    assert sum(r.status == "done" for r in results.values()) == len(results) - 1  # the rest ran


def test_link_step_edited_to_delete_keeps_the_ui_copy(lib, cli):
    """A ``link_duplicate`` step hand-edited to ``delete_duplicate``: the copy is in a UI folder, and only a
    plan made with ``--link none`` may take a model from a UI."""
    obj = lib.plan().to_dict()
    i = next(i for i, s in enumerate(obj["steps"]) if s["path"] == str(lib.ck / "mA.safetensors"))
    assert obj["steps"][i]["action"] == "link_duplicate"
    obj["steps"][i] = dict(obj["steps"][i], action="delete_duplicate", link=None, link_path=None)
    (lib.root / "edited.json").write_text(json.dumps(obj))
    r = cli("apply-plan", lib.root / "edited.json", "--db", lib.db, "--json", "--no-rescan")
    lines = {x["path"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert lines[str(lib.ck / "mA.safetensors")]["status"] == "failed"
    assert "UI" in lines[str(lib.ck / "mA.safetensors")]["message"]
    assert (lib.ck / "mA.safetensors").is_file()
    assert lines[str(lib.dl / "mA.safetensors")]["status"] == "done"
    # the same removal in a plan made with --link none is carried out (asked for exactly that)
    none = lib.plan(link="none")
    (lib.root / "none.json").unlink(missing_ok=True)
    none.save(lib.root / "none.json")
    res = {str(x.path): x for x in apply_plan(lib.root / "none.json", catalog_path=lib.db, rescan=False)}
    assert res[str(lib.ck / "mA.safetensors")].status == "done" and not (lib.ck / "mA.safetensors").exists()


# -- an extra_model_paths.yaml folder inside a scanned root --------------------------------------------------

def _folders(db: Path, folder: Path) -> set:
    with Catalog(db) as cat:
        return {r.folder for r in cat.files() if Path(r.path).parent == folder}


def test_yaml_category_wins_inside_a_scanned_root(lib):
    """``scan ROOT --extra-model-paths`` whose base_path lies inside ROOT: the files below the yaml's
    folders are in that category (a UI folder), so plan-space links them instead of deleting them."""
    db = lib.root / "whole.db"
    with Catalog(db) as cat:
        scan([lib.root], cat, hash=True, fingerprint=True, extra_model_paths=lib.yaml, workers=1)
        plan = plan_space(cat)
    assert _folders(db, lib.extra) == {"checkpoints"}
    steps = {s.path: s for s in plan.steps}
    extra_mc = str(lib.extra / "mC.safetensors")
    assert all(s.action != "delete_duplicate" for s in plan.steps if Path(s.path).parent == lib.extra)
    assert extra_mc in {s.keep for s in plan.steps} or steps[extra_mc].action == "link_duplicate"


def test_rescan_with_the_yaml_updates_unchanged_rows(lib):
    """A file first scanned without the yaml, then re-scanned with it (unchanged on disk): its folder
    becomes the yaml's category, without re-reading it; a later plain re-scan does not forget it."""
    db = lib.root / "again.db"
    with Catalog(db) as cat:
        scan([lib.root], cat, workers=1)
    assert _folders(db, lib.extra) == {None}
    with Catalog(db) as cat:
        s = scan([lib.root], cat, extra_model_paths=lib.yaml, workers=1)
    assert s.unchanged == s.files  # nothing re-read
    assert _folders(db, lib.extra) == {"checkpoints"}
    with Catalog(db) as cat:
        scan([lib.root], cat, workers=1)
    assert _folders(db, lib.extra) == {"checkpoints"}


# -- plan and report files --------------------------------------------------------------------------------------

def test_plan_and_report_make_folders_and_ordinary_files(lib, cli):
    """``-o`` into a missing folder works for plan-space as for report, and both files get the mode any
    file made with open() gets (0o666 less the umask), not mkstemp's 0600."""
    plain = lib.root / "plain.txt"
    with open(plain, "w") as fh:  # the oracle: what the OS gives an ordinary new file here
        fh.write("x")
    want = plain.stat().st_mode & 0o777
    plan_out = lib.root / "nodir" / "deeper" / "p.json"
    r = cli("plan-space", "-o", plan_out, "--db", lib.db)
    assert r.returncode == 0, r.stderr
    assert SpacePlan.load(plan_out).steps and plan_out.stat().st_mode & 0o777 == want
    rep = lib.root / "nodir2" / "r.html"
    r = cli("report", "--format", "html", "-o", rep, "--db", lib.db)
    assert r.returncode == 0, r.stderr
    assert rep.stat().st_mode & 0o777 == want
    assert not [p for p in plan_out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_apply_plan_failure_line_names_the_path_once(lib, cli):
    plan = lib.plan()
    step = next(s for s in plan.steps if s.path == str(lib.dl / "mA.safetensors"))
    plan.save(lib.root / "plan.json")
    Path(step.keep).rename(lib.root / "moved-away")
    r = cli("apply-plan", lib.root / "plan.json", "--db", lib.db, "--no-rescan")
    assert r.returncode == 1
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("failed") and step.path in x]
    assert line.count(step.path) == 1 and "the copy to keep" in line, line


def test_apply_plan_refuses_a_transform_of_a_file_a_symlink_now_points_to(lib):
    """A plan made before a symlink to the file was catalogued: apply-plan checks the catalog itself."""
    target = lib.sd / "mD.safetensors"
    plan = lib.plan()
    assert any(s.path == str(target) for s in plan.steps)
    plan.save(lib.root / "plan.json")
    os.symlink(target, lib.ck / "mD.safetensors")
    lib.scan()
    before = target.read_bytes()
    results = {str(r.path): r for r in apply_plan(lib.root / "plan.json", catalog_path=lib.db, rescan=False)}
    assert results[str(target)].status == "failed" and "symlink" in results[str(target)].message
    assert target.read_bytes() == before and os.path.exists(lib.ck / "mD.safetensors")
