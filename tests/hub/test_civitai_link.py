"""``ckptlab civitai link``/``show`` through the real CLI against the loopback fake CivitAI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes.civitai_server import FakeCivitai, PNG_1x1, file_hashes
from fakes.models import lora_bytes, sd1_checkpoint_bytes
from safetensors.torch import load


@pytest.fixture
def world(tmp_path):
    fake = FakeCivitai().start()
    fake.add_model(100, "Detail Tweaker", "LORA")
    fake.add_model(200, "Tiny SD1", "Checkpoint")
    lora = lora_bytes(seed=1)
    ckpt32 = sd1_checkpoint_bytes(seed=2)
    fake.add_version(1000, 100, [(5000, "detail_tweaker.safetensors", lora)], trained_words=["detailed", "sharp"])
    fake.add_version(2000, 200, [(6000, "tinySD1_v10.safetensors", ckpt32)], name="v1.0")
    lib = tmp_path / "lib"
    (lib / "models" / "Lora").mkdir(parents=True)
    (lib / "models" / "Stable-diffusion").mkdir(parents=True)
    files = {
        "lora": lib / "models" / "Lora" / "detail.safetensors",
        # same tensors, edited header metadata: SHA256 differs, AutoV3 does not
        "lora_edited": lib / "models" / "Lora" / "detail_renamed.safetensors",
        "ckpt": lib / "models" / "Stable-diffusion" / "tiny.safetensors",
        # the fp16 copy of the checkpoint: not on CivitAI, same tensors at lower precision
        "ckpt16": lib / "models" / "Stable-diffusion" / "tiny-fp16.safetensors",
        # the original training checkpoint: pickle, with EMA weights (converted + pruned = the file above)
        "ckpt_pickle": lib / "models" / "Stable-diffusion" / "tiny-ema.ckpt",
        "unknown": lib / "models" / "Lora" / "homemade.safetensors",
    }
    files["lora"].write_bytes(lora)
    files["lora_edited"].write_bytes(lora_bytes(seed=1, metadata={"ss_output_name": "renamed by a tool"}))
    files["ckpt"].write_bytes(ckpt32)
    files["ckpt16"].write_bytes(sd1_checkpoint_bytes(seed=2, dtype=np.float16))
    files["unknown"].write_bytes(lora_bytes(seed=9))
    sd = load(ckpt32)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelout2weight"] = sd["model.diffusion_model.out.2.weight"] * 0.5
    torch.save({"state_dict": sd, "global_step": 1000}, files["ckpt_pickle"])
    env = {"CKPTLAB_CIVITAI_URL": fake.api_url, "CIVITAI_API_TOKEN": fake.token}
    yield fake, lib, files, env
    fake.stop()


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_name(rows):
    return {Path(r["path"]).name: r for r in rows}


def test_hash_oracles_hold_for_the_fixture(world):
    fake, lib, files, env = world
    a, b = (file_hashes(files[k].read_bytes()) for k in ("lora", "lora_edited"))
    assert a["SHA256"] != b["SHA256"] and a["AutoV3"] == b["AutoV3"]


def test_link_sha256_autov3_inherited_and_miss(world, cli):
    fake, lib, files, env = world
    r = cli("civitai", "link", lib, "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = by_name(jsonl(r.stdout))
    assert rows["detail.safetensors"]["status"] == "linked"
    assert rows["detail.safetensors"]["matched_by"] == "sha256"
    assert rows["detail.safetensors"]["version_id"] == 1000
    assert rows["detail_renamed.safetensors"]["status"] == "linked"
    assert rows["detail_renamed.safetensors"]["matched_by"] == "autov3"
    assert rows["tiny.safetensors"]["version_id"] == 2000
    inh = rows["tiny-fp16.safetensors"]
    assert inh["status"] == "inherited" and inh["matched_by"] == "fingerprint" and inh["version_id"] == 2000
    assert inh["inherited_from"] == file_hashes(files["ckpt"].read_bytes())["SHA256"]
    pk = rows["tiny-ema.ckpt"]
    assert pk["status"] == "inherited" and pk["version_id"] == 2000 and pk["inherited_from"] == inh["inherited_from"]
    assert rows["homemade.safetensors"]["status"] == "not_found"
    # one bulk POST carried every SHA256; only the LoRA misses were asked again by AutoV3
    posts = [q for q in fake.requests if q.method == "POST"]
    assert len(posts) == 1
    gets = [q.path.rsplit("/", 1)[-1] for q in fake.api_requests("/api/v1/model-versions/by-hash/")]
    assert sorted(gets) == sorted([file_hashes(files[k].read_bytes())["AutoV3"] for k in ("lora_edited", "unknown")])
    # nothing was written next to the models without --write-sidecars
    assert sorted(p.name for p in (lib / "models" / "Lora").iterdir()) == [
        "detail.safetensors", "detail_renamed.safetensors", "homemade.safetensors"]
    # a second run asks nothing for linked files
    n = len(fake.requests)
    r2 = cli("civitai", "link", lib, "--json", env=env)
    rows2 = by_name(jsonl(r2.stdout))
    assert rows2["detail.safetensors"]["status"] == "already"
    assert rows2["tiny-fp16.safetensors"]["status"] == "already"
    assert fake.requests[n:] == []  # linked files are not asked again, recent misses neither
    assert rows2["homemade.safetensors"]["status"] == "not_found"
    r3 = cli("civitai", "link", files["unknown"], "--refresh", "--json", env=env)
    assert jsonl(r3.stdout)[0]["status"] == "not_found"
    assert [q.method for q in fake.requests[n:]] == ["POST", "GET"]  # --refresh asks again (SHA256, AutoV3)


def test_write_sidecars_and_never_clobber_user_json(world, cli):
    fake, lib, files, env = world
    user_json = lib / "models" / "Lora" / "detail_renamed.json"
    user_json.write_text('{"activation text": "mine", "notes": "hand written"}')
    r = cli("civitai", "link", lib / "models" / "Lora", "--write-sidecars", env=env)
    assert r.returncode == 0, r.stderr
    folder = lib / "models" / "Lora"
    info = json.loads((folder / "detail.civitai.info").read_text())
    assert info["id"] == 1000 and info["modelId"] == 100
    assert info["creator"]["username"] == "tester" and info["model"]["tags"] == ["style", "test"]
    meta = json.loads((folder / "detail.json").read_text())
    assert meta["activation text"] == "detailed, sharp"
    assert meta["sd version"] == "SD1" and meta["preferred weight"] == 0
    assert (folder / "detail.preview.png").read_bytes() == PNG_1x1
    assert user_json.read_text() == '{"activation text": "mine", "notes": "hand written"}'
    assert (folder / "detail_renamed.civitai.info").exists()
    assert not (folder / "homemade.civitai.info").exists()
    # previews come from storage without credentials
    imgs = [q for q in fake.requests if q.server == "storage" and q.path.startswith("/images/")]
    assert imgs and all("authorization" not in q.headers for q in imgs)


def test_never_regress_on_outage_404_and_revisions_on_change(world, cli):
    fake, lib, files, env = world
    lora = files["lora"]
    assert cli("civitai", "link", lora, env=env).returncode == 0

    def show():
        r = cli("civitai", "show", lora, "--json", env=env)
        assert r.returncode == 0, r.stderr
        return jsonl(r.stdout)[0]

    first = show()
    assert first["latest"]["trainedWords"] == ["detailed", "sharp"] and len(first["revisions"]) == 1

    fake.down = True  # outage: 503 on every API call (retried, then given up)
    r = cli("civitai", "link", lora, "--refresh", "--json", env={**env, "CKPTLAB_HTTP_BACKOFF": "0"})
    assert r.returncode == 0, r.stderr
    assert jsonl(r.stdout)[0]["status"] == "kept"
    assert show()["latest"] == first["latest"] and show()["link"]["upstream_status"] == "unreachable"

    fake.down = False
    gone = fake.versions.pop(1000)  # upstream 404
    r = cli("civitai", "link", lora, "--refresh", "--json", env=env)
    assert jsonl(r.stdout)[0]["status"] == "not_found"
    s = show()
    assert s["latest"] == first["latest"] and s["link"]["upstream_status"] == "not_found"

    fake.versions[1000] = gone
    gone["stats"]["downloadCount"] += 100  # volatile counters alone are not a new revision
    r = cli("civitai", "link", lora, "--refresh", "--json", env=env)
    assert jsonl(r.stdout)[0]["status"] == "refreshed"
    assert len(show()["revisions"]) == 1

    gone["trainedWords"] = ["detailed", "sharp", "new word"]
    r = cli("civitai", "link", lora, "--refresh", "--json", env=env)
    assert jsonl(r.stdout)[0]["status"] == "updated"
    s = show()
    assert [x["revision"] for x in s["revisions"]] == [1, 2]
    assert s["latest"]["trainedWords"][-1] == "new word"
    assert s["link"]["upstream_status"] == "ok"


def test_first_link_during_outage_is_an_error_and_stores_nothing(world, cli):
    fake, lib, files, env = world
    fake.down = True
    r = cli("civitai", "link", files["lora"], "--json", env={**env, "CKPTLAB_HTTP_BACKOFF": "0"})
    assert r.returncode == 1
    row = jsonl(r.stdout)[0]
    assert row["status"] == "error" and "503" in row["message"]
    r = cli("civitai", "show", files["lora"], env=env)
    assert r.returncode == 1 and "not linked" in r.stderr


def test_429_then_success(world, cli):
    fake, lib, files, env = world
    fake.script["/api/v1/model-versions/by-hash"] = [(429, {"Retry-After": "0"}), (429, {"Retry-After": "0"})]
    r = cli("civitai", "link", files["lora"], "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert jsonl(r.stdout)[0]["status"] == "linked"
    assert len([q for q in fake.requests if q.method == "POST"]) == 3


def test_token_never_written_anywhere(world, cli):
    fake, lib, files, env = world
    assert cli("civitai", "link", lib, "--write-sidecars", env=env).returncode == 0
    assert cli("civitai", "link", lib, "--refresh", "--write-sidecars", "--json", env=env).returncode == 0
    token = fake.token.encode()
    roots = [lib.parent, Path(os.environ["HOME"])]
    scanned = 0
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                scanned += 1
                assert token not in (Path(dirpath) / n).read_bytes(), Path(dirpath) / n
    assert scanned > 10
    # and the API did receive it, as a header only
    assert all(q.headers.get("authorization") == f"Bearer {fake.token}" for q in fake.api_requests("/api/v1/"))
    assert all("token" not in q.path for q in fake.requests)


def test_bad_base_url_and_missing_path_are_one_line_errors(world, cli):
    fake, lib, files, env = world
    r = cli("civitai", "link", lib / "nope.safetensors", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    r = cli("civitai", "link", files["lora"], "--base-url", "ftp://x", env=env)
    assert r.returncode == 1 and "http://" in r.stderr and "Traceback" not in r.stderr


def test_link_without_paths_covers_the_catalog(world, cli):
    fake, lib, files, env = world
    assert cli("civitai", "link", files["lora"], files["unknown"], env=env).returncode == 0
    r = cli("civitai", "link", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = by_name(jsonl(r.stdout))
    assert set(rows) == {"detail.safetensors", "homemade.safetensors"}  # catalogued files only
    assert rows["detail.safetensors"]["status"] == "already"
    assert rows["homemade.safetensors"]["status"] == "not_found"


def test_copy_added_later_inherits_from_a_file_linked_in_an_earlier_run(world, cli):
    fake, lib, files, env = world
    r = cli("civitai", "link", files["ckpt"], "--json", env=env)
    assert jsonl(r.stdout)[0]["status"] == "linked"
    r = cli("civitai", "link", files["ckpt16"], "--json", env=env)  # the original is not named this time
    row = jsonl(r.stdout)[0]
    assert row["status"] == "inherited" and row["version_id"] == 2000
    assert row["inherited_from"] == file_hashes(files["ckpt"].read_bytes())["SHA256"]


def test_identical_copies_each_get_their_row_and_sidecars(world, cli):
    fake, lib, files, env = world
    copy = lib / "models" / "Lora" / "sub" / "detail copy.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(files["lora"].read_bytes())
    r = cli("civitai", "link", files["lora"], copy, "--write-sidecars", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = by_name(jsonl(r.stdout))
    assert rows["detail.safetensors"]["status"] == rows["detail copy.safetensors"]["status"] == "linked"
    assert (copy.parent / "detail copy.civitai.info").exists() and (files["lora"].parent / "detail.civitai.info").exists()
    assert len([q for q in fake.requests if q.method == "POST"]) == 1
    assert json.loads(fake.requests[0].body) == [file_hashes(copy.read_bytes())["SHA256"]]  # asked once


def test_timeout_on_refresh_keeps_everything(world, cli):
    fake, lib, files, env = world
    assert cli("civitai", "link", files["lora"], env=env).returncode == 0
    fake.api_delay = 3.0
    r = cli("civitai", "link", files["lora"], "--refresh", "--json",
            env={**env, "CKPTLAB_HTTP_TIMEOUT": "0.3", "CKPTLAB_HTTP_BACKOFF": "0"})
    fake.api_delay = 0.0
    assert r.returncode == 0, r.stderr
    row = jsonl(r.stdout)[0]
    assert row["status"] == "kept" and "Timeout" in row["message"]
    s = jsonl(cli("civitai", "show", files["lora"], "--json", env=env).stdout)[0]
    assert s["latest"]["id"] == 1000 and s["link"]["upstream_status"] == "unreachable"


def test_bf16_copy_inherits_the_link_of_its_fp32_source(world, cli):
    from safetensors.torch import save

    fake, lib, files, env = world
    sd = load(files["ckpt"].read_bytes())
    bf16 = lib / "models" / "Stable-diffusion" / "tiny-bf16.safetensors"
    bf16.write_bytes(save({k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in sd.items()}))
    r = cli("civitai", "link", lib / "models" / "Stable-diffusion", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = by_name(jsonl(r.stdout))
    inh = rows["tiny-bf16.safetensors"]
    assert inh["status"] == "inherited" and inh["matched_by"] == "fingerprint" and inh["version_id"] == 2000
    assert inh["inherited_from"] == file_hashes(files["ckpt"].read_bytes())["SHA256"]


def test_link_of_the_whole_catalog_never_creates_one(cli, tmp_path):
    """``civitai link --db NEW`` (no files named: link what the catalog holds) refuses a catalog that is not
    there, as show/dupes/report do, instead of leaving an empty catalog file behind."""
    db = tmp_path / "typo.db"
    r = cli("civitai", "link", "--db", db, "--base-url", "http://127.0.0.1:9")
    assert r.returncode == 1 and "no catalog here yet" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not db.exists()
