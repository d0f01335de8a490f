"""Jobs started from the app (``ckptlab.web.jobs``, ``pages_jobs``, ``worker``): forms, worker processes, live
progress over server-sent events, cancel without partial files, state that survives a reload, lost workers.

Oracles: the public API run directly on the same input into another folder (convert, prune), ``hashlib`` (hash),
the catalog's rows read with plain SQL, the bytes of the input read before and after.

A worker is a real process (``python -m ckptlab.web.worker``). Tests that need a job to last a few seconds start
the worker through a wrapper written here, in the test (``slow_worker``): it sleeps after each progress report,
so the job is slow deterministically; the product has no hook for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.web import make_client
from fakes.web_fixtures import JOBS_CKPT, JOBS_LORA

import ckptlab
from ckptlab.web import jobs

CKPT, SAFETENSORS = JOBS_CKPT, JOBS_LORA
pytestmark = pytest.mark.usefixtures("no_stray_workers")
FINAL = ("done", "failed", "cancelled", "lost")


def status_of(html: str) -> str:
    m = re.search(r'id="job-status"[^>]*>([^<]*)<', html)
    assert m, html[:500]
    return m.group(1).strip()


def wait_final(client, job_id: int, limit_s: float = 120) -> str:
    """Poll the job page until a final state (a deadline against a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        r = client.get(f"/jobs/{job_id}")
        assert r.status_code == 200
        s = status_of(r.text)
        if s in FINAL:
            return s
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


def wait_for(pred, limit_s: float = 60):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def start(client, kind: str, **fields) -> int:
    r = client.post("/jobs", data={"kind": kind, **{k: str(v) for k, v in fields.items()}})
    assert r.status_code == 303, r.text[:800]
    m = re.fullmatch(r"/jobs/(\d+)", r.headers["location"])
    assert m
    return int(m.group(1))


def rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute("SELECT id, kind, status FROM web_jobs ORDER BY id").fetchall()
    finally:
        conn.close()


def tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.fixture
def library_copy(jobs_library) -> Path:
    """The small jobs library (the shared ``rw_client`` then serves it)."""
    return jobs_library


@pytest.fixture
def slow_worker(tmp_path, monkeypatch):
    """Start workers through a wrapper that sleeps ``delay`` seconds after every progress report."""
    def use(delay: float):
        hook = tmp_path / "slow_worker.py"
        hook.write_text(
            "import sys, time\n"
            "from ckptlab.web import worker\n"
            f"DELAY = {delay!r}\n"
            "orig = worker.Reporter.__call__\n"
            "def slow(self, advance=0, *, total=None, description=None):\n"
            "    orig(self, advance, total=total, description=description)\n"
            "    if advance:\n"
            "        time.sleep(DELAY)\n"
            "worker.Reporter.__call__ = slow\n"
            "sys.exit(worker.main())\n")
        monkeypatch.setattr(jobs, "worker_argv",
                            lambda db, job_id: [sys.executable, str(hook), str(db), str(job_id)])
    return use


# ------------------------------------------------------------------------------------------------ forms


def test_form_is_prefilled_from_the_path(rw_client, library_copy):
    ckpt = library_copy / CKPT
    r = rw_client.get("/jobs/new/convert", params={"path": str(ckpt)})
    assert r.status_code == 200
    form = r.text[r.text.index('<form id="job-form"'):]
    assert 'action="/jobs"' in form[:200] and 'method="post"' in form[:200]
    assert f'name="path" value="{ckpt}"' in form
    assert 'button type="submit"' in form
    assert 'name="csrf"' in form  # plain form: the CSRF field
    # the CLI's option names and defaults
    r = rw_client.get("/jobs/new/prune", params={"path": str(ckpt)})
    assert "--ema" in r.text and "--out-dir" in r.text
    assert re.search(r'<option value="drop" selected>', r.text)
    assert rw_client.get("/jobs/new/nosuchkind").status_code == 404


def test_every_kind_has_a_form(client):
    from ckptlab.web.job_kinds import KINDS

    for kind, spec in KINDS.items():
        r = client.get(f"/jobs/new/{kind}")
        if spec.internal:  # apply-plan starts from the disk page's review only
            assert r.status_code == 404, kind
            continue
        assert r.status_code == 200, kind
        assert 'id="job-form"' in r.text


# ------------------------------------------------------------------------------------------------ running


def test_convert_from_the_form_matches_the_api_and_is_catalogued(rw_client, library_copy, tmp_path):
    ckpt = library_copy / CKPT
    job_id = start(rw_client, "convert", path=ckpt)
    assert wait_final(rw_client, job_id) == "done"
    made = ckpt.with_suffix(".safetensors")
    assert made.is_file()
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    [res] = ckptlab.convert(ckpt, out_dir=oracle_dir)
    expected, got = tensors(Path(res.output)), tensors(made)
    assert expected.keys() == got.keys()
    assert all(expected[k].dtype == got[k].dtype and expected[k].tobytes() == got[k].tobytes() for k in expected)
    # the catalog learnt the output (incremental scan of its root), and the result links to its page
    conn = sqlite3.connect(str(library_copy / "catalog.db"))
    row = conn.execute("SELECT id FROM files WHERE path = ? AND status = 'present'",
                       (os.fsencode(str(made)),)).fetchone()
    conn.close()
    assert row is not None
    page = rw_client.get(f"/jobs/{job_id}").text
    result = page[page.index('id="job-result"'):]
    assert f'href="/model/{row[0]}"' in result
    assert 'id="cancel"' not in page  # not running any more


def test_prune_from_the_form_matches_the_api(rw_client, library_copy, tmp_path):
    ckpt = library_copy / CKPT
    out, oracle = tmp_path / "out", tmp_path / "oracle"
    out.mkdir()
    oracle.mkdir()
    job_id = start(rw_client, "prune", path=ckpt, ema="drop", precision="fp16", out_dir=out)
    assert wait_final(rw_client, job_id) == "done"
    [res] = ckptlab.prune(ckpt, ema="drop", precision="fp16", out_dir=oracle)
    [made] = list(out.iterdir())
    assert made.name == Path(res.output).name
    expected, got = tensors(Path(res.output)), tensors(made)
    assert expected.keys() == got.keys() and not any(k.startswith("model_ema.") for k in got)
    assert all(expected[k].tobytes() == got[k].tobytes() for k in expected)
    job = jobs.get(library_copy / "catalog.db", job_id)
    assert job.made == [str(made)]
    assert job.result["items"][0]["tensors_out"] == res.tensors_out


def test_hash_job_matches_hashlib(rw_client, library_copy):
    f = library_copy / SAFETENSORS
    job_id = start(rw_client, "hash", path=f)
    assert wait_final(rw_client, job_id) == "done"
    job = jobs.get(library_copy / "catalog.db", job_id)
    assert job.result["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest().upper()
    assert job.result["size"] == f.stat().st_size
    assert job.done == job.total == f.stat().st_size


def test_events_stream_progress_to_done(rw_client, library_copy, tmp_path, slow_worker):
    slow_worker(0.002)  # enough reports for the stream to see the work move
    out = tmp_path / "out"
    out.mkdir()
    job_id = start(rw_client, "convert", path=library_copy / CKPT, out_dir=out)
    events = []
    with rw_client.stream("GET", f"/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    # the stream ended by itself, after the final state
    assert events[-1]["status"] == "done"
    assert all(e["status"] not in FINAL for e in events[:-1])
    done = [e["done"] for e in events]
    assert done == sorted(done)
    moving = [e for e in events if e["status"] == "running" and e["total"] and 0 < e["done"] < e["total"]]
    assert moving, events
    size = sum(t.nbytes for t in tensors(out / "v1-5-pruned.safetensors").values())
    assert events[-1]["done"] == events[-1]["total"] == size
    # a finished job's stream is one event
    with rw_client.stream("GET", f"/jobs/{job_id}/events") as r:
        again = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    assert [e["status"] for e in again] == ["done"]


# ------------------------------------------------------------------------------------------------ cancel / lost


def test_cancel_leaves_no_partial_file(rw_client, library_copy, tmp_path, slow_worker):
    slow_worker(0.2)  # ~1,800 reports: minutes of work unless cancelled
    ckpt = library_copy / CKPT
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    db = library_copy / "catalog.db"
    job_id = start(rw_client, "convert", path=ckpt, out_dir=out)
    # it is writing: progress moved and the temporary is there
    wait_for(lambda: (j := jobs.get(db, job_id)) and j.status == "running" and j.done > 0)
    temps = wait_for(lambda: [p.name for p in out.iterdir()])
    assert all(n.startswith(".") and n.endswith(".tmp") for n in temps), temps
    page = rw_client.get(f"/jobs/{job_id}").text
    assert status_of(page) == "running" and 'id="cancel"' in page
    r = rw_client.post(f"/jobs/{job_id}/cancel", headers={"hx-request": "true"})
    assert r.status_code == 200 and 'id="job-panel"' in r.text
    assert wait_final(rw_client, job_id) == "cancelled"
    assert list(out.iterdir()) == []  # no output, no temporary
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before
    pid = jobs.get(db, job_id).pid
    wait_for(lambda: not jobs._alive(pid))
    assert not jobs.cancel(db, job_id)  # not running any more


def test_cancel_by_plain_form_redirects(rw_client, library_copy, tmp_path, slow_worker):
    slow_worker(0.2)
    out = tmp_path / "out"
    out.mkdir()
    job_id = start(rw_client, "convert", path=library_copy / CKPT, out_dir=out)
    r = rw_client.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job_id}"
    assert wait_final(rw_client, job_id) == "cancelled"
    assert list(out.iterdir()) == []


def test_killed_worker_is_lost(rw_client, library_copy, tmp_path, slow_worker):
    slow_worker(0.2)
    out = tmp_path / "out"
    out.mkdir()
    db = library_copy / "catalog.db"
    job_id = start(rw_client, "convert", path=library_copy / CKPT, out_dir=out)
    job = wait_for(lambda: (j := jobs.get(db, job_id)) and j.status == "running" and j)
    os.kill(job.pid, signal.SIGKILL)
    assert wait_final(rw_client, job_id) == "lost"
    row = [r for r in rows(db) if r[0] == job_id][0]
    assert row[2] == "lost"  # written to the row: every reader sees it
    assert "ended without reporting" in jobs.get(db, job_id).error


def test_a_pid_taken_by_another_process_is_lost(library_copy):
    """A running row whose pid now belongs to some other live process (after a reboot, pid reuse) is lost, even
    with a fresh heartbeat; a queued row whose worker never started is not lost while it is young."""
    db = library_copy / "catalog.db"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        conn = sqlite3.connect(str(db), isolation_level=None)
        now = time.time()
        conn.execute("INSERT INTO web_jobs(id, kind, params, status, pid, created, started, heartbeat) "
                     "VALUES (7, 'hash', '{}', 'running', ?, ?, ?, ?)", (other.pid, now, now, now))
        conn.execute("INSERT INTO web_jobs(id, kind, params, status, created) VALUES (8, 'hash', '{}', 'queued', ?)",
                     (now,))
        conn.close()
        assert jobs.get(db, 7).status == "lost"
        assert jobs.get(db, 8).status == "queued"
    finally:
        other.kill()
        other.wait()


def test_state_survives_a_reload(rw_client, library_copy):
    db = library_copy / "catalog.db"
    job_id = start(rw_client, "hash", path=library_copy / SAFETENSORS)
    assert wait_final(rw_client, job_id) == "done"
    with make_client(db) as other:  # another tab, or a restarted server
        r = other.get("/jobs")
        assert re.search(rf'<tr data-id="{job_id}" class="job done">', r.text)
        assert status_of(other.get(f"/jobs/{job_id}").text) == "done"
    assert rows(db) == [(job_id, "hash", "done")]


def test_jobs_list_rows_refresh_while_active(rw_client, library_copy, tmp_path, slow_worker):
    slow_worker(0.2)
    out = tmp_path / "out"
    out.mkdir()
    job_id = start(rw_client, "convert", path=library_copy / CKPT, out_dir=out)
    html = rw_client.get("/jobs").text
    assert re.search(r'<tbody id="job-rows" hx-get="/jobs\?rows=1[^"]*" hx-trigger="every 2s"', html)
    frag = rw_client.get("/jobs", params={"rows": "1"}, headers={"hx-request": "true"}).text
    assert frag.lstrip().startswith('<tbody id="job-rows"') and "<html" not in frag
    assert f'<tr data-id="{job_id}" class="job ' in frag
    assert jobs.cancel(library_copy / "catalog.db", job_id)
    assert wait_final(rw_client, job_id) == "cancelled"
    html = rw_client.get("/jobs").text
    assert 'hx-trigger="every 2s"' not in html  # nothing active: the polling stops


def test_jobs_list_is_newest_first(rw_client, library_copy):
    a = start(rw_client, "check", path=library_copy / SAFETENSORS)
    b = start(rw_client, "hash", path=library_copy / SAFETENSORS)
    for j in (a, b):
        assert wait_final(rw_client, j) == "done", jobs.get(library_copy / "catalog.db", j)
    html = rw_client.get("/jobs").text
    table = html[html.index('<table id="jobs"'):]
    assert [int(x) for x in re.findall(r'<tr data-id="(\d+)"', table)] == [b, a]
    job = jobs.get(library_copy / "catalog.db", a)
    assert job.result["verdict"] == ckptlab.check(library_copy / SAFETENSORS).verdict


# ------------------------------------------------------------------------------------------------ refusals


def test_bad_params_are_400_with_one_line_and_no_job(rw_client, library_copy, tmp_path):
    db = library_copy / "catalog.db"
    missing = tmp_path / "nope.ckpt"
    r = rw_client.post("/jobs", data={"kind": "convert", "path": str(missing)})
    assert r.status_code == 400
    assert 'id="job-form"' in r.text  # the form again, with what was typed
    assert re.search(r'id="form-error"[^>]*>[^<\n]*no such file', r.text)
    r = rw_client.post("/jobs", data={"kind": "prune", "path": str(library_copy / CKPT), "ema": "sometimes"})
    assert r.status_code == 400 and "--ema" in r.text
    r = rw_client.post("/jobs", data={"kind": "precision", "path": str(library_copy / CKPT)})
    assert r.status_code == 400 and "--to: required" in r.text
    # the API's own refusal (its dry run): an existing output without --overwrite
    ckpt = library_copy / CKPT
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    with pytest.raises(ckptlab.CkptlabError) as api_error:
        ckptlab.convert(ckpt, taken, dry_run=True)
    r = rw_client.post("/jobs", data={"kind": "convert", "path": str(ckpt), "out": str(taken)})
    assert r.status_code == 400
    line = re.search(r'id="form-error"[^>]*>([^<]*)<', r.text).group(1)
    import html as html_mod

    assert html_mod.unescape(line) == str(api_error.value).splitlines()[0]
    assert taken.read_bytes() == b"x"
    assert rows(db) == []
    assert rw_client.post("/jobs", data={"kind": "nosuch"}).status_code == 404
    assert rw_client.get("/jobs/999").status_code == 404


def test_second_job_to_the_same_output_is_refused(rw_client, library_copy, tmp_path, slow_worker):
    slow_worker(0.2)
    db = library_copy / "catalog.db"
    out = tmp_path / "out"
    out.mkdir()
    first = start(rw_client, "convert", path=library_copy / CKPT, out_dir=out)
    r = rw_client.post("/jobs", data={"kind": "convert", "path": str(library_copy / CKPT),
                                      "out": str(out / "v1-5-pruned.safetensors")})
    assert r.status_code == 400
    assert f"job {first} (convert) is already writing" in r.text
    assert [x[0] for x in rows(db)] == [first]
    assert jobs.cancel(db, first)
    assert wait_final(rw_client, first) == "cancelled"
    assert list(out.iterdir()) == []


def test_csrf_is_required_and_plain_forms_carry_it(library_copy):
    db = library_copy / "catalog.db"
    with make_client(db) as c:
        token = c.headers.pop("x-csrf-token")
        data = {"kind": "hash", "path": str(library_copy / SAFETENSORS)}
        assert c.post("/jobs", data=data).status_code == 403
        assert rows(db) == []
        r = c.post("/jobs", data={**data, "csrf": token})  # what {{ csrf_field() }} sends
        assert r.status_code == 303
        job_id = int(r.headers["location"].rsplit("/", 1)[1])
        c.headers["x-csrf-token"] = token
        assert wait_final(c, job_id) == "done"


def test_strings_are_escaped(rw_client, tmp_path):
    evil = tmp_path / "<b onmouseover=alert(1)>x.safetensors"
    evil.write_bytes(b"not a model")
    job_id = start(rw_client, "hash", path=evil)
    assert wait_final(rw_client, job_id) == "done"
    for url in (f"/jobs/{job_id}", "/jobs"):
        html = rw_client.get(url).text
        assert "<b onmouseover" not in html
        assert "&lt;b onmouseover=alert(1)&gt;x.safetensors" in html


# ------------------------------------------------------------------------------------------------ merge form


def test_merge_form_previews_the_recipe(client, sample_library):
    from ckptlab.merging import dumps, one_step_recipe

    a = sample_library / "a1111/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors"
    b = sample_library / "a1111/models/Stable-diffusion/anything-merge-v3.safetensors"
    r = client.get("/jobs/new/merge", params={"path": str(a)})
    assert r.status_code == 200 and f'name="model_a" value="{a}"' in r.text
    assert 'id="recipe-preview"' in r.text and 'hx-get="/jobs/recipe"' in r.text
    r = client.get("/jobs/recipe", params={"method": "weighted_sum", "model_a": str(a), "model_b": str(b),
                                           "alpha": "0.3", "output": ""},
                   headers={"hx-request": "true"})
    assert r.status_code == 200
    expected = dumps(one_step_recipe("weighted_sum", [str(a), str(b)], params={"alpha": "0.3"}))
    import html as html_mod

    shown = html_mod.unescape(re.search(r'<pre id="recipe-text"[^>]*>(.*?)</pre>', r.text, re.S).group(1))
    assert shown == expected
    r = client.get("/jobs/recipe", params={"method": "weighted_sum", "model_a": str(a), "model_b": str(b),
                                           "density": "0.5"})
    assert "does not take --density" in r.text


def test_merge_job_matches_the_api(rw_client, library_copy, sample_library, tmp_path):
    sd = sample_library / "a1111/models/Stable-diffusion"
    a, b = sd / "v1-5-pruned-emaonly.safetensors", sd / "anything-merge-v3.safetensors"
    out = tmp_path / "merged.safetensors"
    job_id = start(rw_client, "merge", method="weighted_sum", model_a=a, model_b=b, alpha="0.3", dtype="fp16",
                   output=out)
    assert wait_final(rw_client, job_id) == "done"
    oracle = ckptlab.merge("weighted_sum", [a, b], tmp_path / "oracle.safetensors", alpha="0.3", precision="fp16")
    expected, got = tensors(Path(oracle.output)), tensors(out)
    assert expected.keys() == got.keys()
    assert all(expected[k].tobytes() == got[k].tobytes() for k in expected)
    assert jobs.get(library_copy / "catalog.db", job_id).made == [str(out)]


def test_apply_plan_kind_refuses_a_bad_plan(library_copy, tmp_path):
    from ckptlab.web.pages_disk import plans_dir

    bad = plans_dir(library_copy / "catalog.db") / "plan.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ckptlab.CkptlabError):
        jobs.submit(library_copy / "catalog.db", "apply-plan", {"plan": str(bad)})
    assert rows(library_copy / "catalog.db") == []


def test_worker_refuses_a_job_that_is_not_queued(library_copy):
    from ckptlab.web import worker

    db = library_copy / "catalog.db"
    assert worker.main([str(db), "12345"]) == 2
    assert worker.main(["only-one-arg"]) == 2



