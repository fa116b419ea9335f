"""What the review page refuses, by real HTTP requests against the real `z0inf review serve`: other
sites' host names (DNS rebinding), oversized bodies and notes, weak tokens on a public bind, repeated
wrong tokens, redirects off the site; and what it shows instead of a bare 500 when the store or a
queue breaks (recovering once they are back)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import requests

from z0inf_pipeline.review import RunLayout
from z0inf_pipeline.review.store import MAX_NOTE_CHARS
from z0inf_pipeline.review.web.app import MAX_REQUEST_BYTES, WRONG_TOKEN_LIMIT

from ...conftest import _stop
from .conftest import start_server
from .test_review_page import queue_of, store_of

STRONG = "a-token-of-24-characters"


def _form_token(session: requests.Session, url: str, **headers) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', session.get(url, headers=headers, timeout=30).text).group(1)


def test_requests_naming_another_host_are_refused(analysed_run, fresh_data):
    served = start_server(analysed_run, fresh_data, "--allowed-host", "review.example.org")
    port = served.url.rsplit(":", 1)[1]
    run_url = f"{served.url}/runs/{analysed_run.run_id}"
    try:
        evil = {"Host": f"evil.example:{port}"}
        page = requests.get(run_url, headers=evil, timeout=30)
        assert page.status_code == 421 and "csrf" not in page.text and "evil.example" in page.text
        # a rebinding page cannot read the form token, nor post with one it got elsewhere
        session = requests.Session()
        csrf = _form_token(session, run_url)
        example_id = int(queue_of(analysed_run, served)["example_id"].iloc[0])
        form = {"csrf": csrf, "reviewer": "mallory", "example_id": example_id, "action": "drop"}
        posted = session.post(f"{run_url}/decide", data=form, timeout=30, allow_redirects=False,
                              headers={**evil, "Origin": f"http://evil.example:{port}"})
        assert posted.status_code == 421
        assert store_of(served).history(analysed_run.run_id).empty
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"review.example.org:{port}", "REVIEW.example.org"):
            assert requests.get(run_url, headers={"Host": name}, timeout=30).status_code == 200, name
    finally:
        _stop(served.process)


def test_oversized_bodies_and_notes_are_refused_and_nothing_is_stored(analysed_run, server):
    run_url = f"{server.url}/runs/{analysed_run.run_id}"
    session = requests.Session()
    csrf = _form_token(session, run_url)
    example_id = int(queue_of(analysed_run, server)["example_id"].iloc[0])
    form = {"csrf": csrf, "reviewer": "ana", "example_id": example_id, "action": "drop"}

    huge = session.post(f"{run_url}/decide", data={**form, "note": "x" * (MAX_REQUEST_BYTES + 1)}, timeout=60,
                        allow_redirects=False)
    assert huge.status_code == 413 and "larger than" in huge.text
    long = session.post(f"{run_url}/decide", data={**form, "note": "y" * (MAX_NOTE_CHARS + 1)}, timeout=30,
                        allow_redirects=False)
    assert long.status_code == 400 and f"at most {MAX_NOTE_CHARS}" in long.text
    assert store_of(server).history(analysed_run.run_id).empty
    fits = session.post(f"{run_url}/decide", data={**form, "note": "z" * MAX_NOTE_CHARS}, timeout=30,
                        allow_redirects=False)
    assert fits.status_code == 303
    assert store_of(server).history(analysed_run.run_id)["note"].tolist() == ["z" * MAX_NOTE_CHARS]


def test_weak_tokens_on_a_public_bind_are_refused_with_a_strong_one_offered(analysed_run, fresh_data):
    for token in (" ", "x", "fifteen-chars-x", " " * 20):
        done = subprocess.run(
            [sys.executable, "-m", "z0inf_pipeline.cli", "review", "serve", "--host", "0.0.0.0", "--port", "0",
             "--token", token],
            env=analysed_run.env(fresh_data), capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 2, (token, done.stdout, done.stderr)
        assert "at least 16 characters" in done.stderr and re.search(r"--token [A-Za-z0-9_-]{24,}", done.stderr)
        assert "Traceback" not in done.stderr


def test_repeated_wrong_tokens_are_answered_429(analysed_run, fresh_data):
    served = start_server(analysed_run, fresh_data, "--token", STRONG)
    try:
        run_url = f"{served.url}/runs/{analysed_run.run_id}"
        codes = [requests.get(run_url, headers={"X-Z0inf-Token": f"guess-{i}"}, timeout=30).status_code
                 for i in range(WRONG_TOKEN_LIMIT + 1)]
        assert codes == [401] * WRONG_TOKEN_LIMIT + [429]
        # locked out for the window, the right token included: guessing gains nothing
        locked = requests.get(f"{run_url}?token={STRONG}", timeout=30, allow_redirects=False)
        assert locked.status_code == 429 and "Retry-After" in locked.headers
    finally:
        _stop(served.process)


def test_the_reviewer_form_only_redirects_within_the_site(analysed_run, server):
    session = requests.Session()
    csrf = _form_token(session, server.url + "/")
    for then in ("/\t/evil.example", "//evil.example", "/\\evil.example", "https://evil.example", "/\n/evil.example"):
        answer = session.post(f"{server.url}/reviewer", data={"csrf": csrf, "reviewer": "ana", "then": then},
                              timeout=30, allow_redirects=False)
        assert answer.status_code == 303 and answer.headers["Location"] in ("/", f"{server.url}/"), then
    fine = session.post(f"{server.url}/reviewer", data={"csrf": csrf, "reviewer": "ana", "then": "/runs/x?page=2"},
                        timeout=30, allow_redirects=False)
    assert fine.headers["Location"].endswith("/runs/x?page=2")


def test_a_missing_store_or_a_corrupt_queue_is_an_error_page_and_the_page_recovers(analysed_run, server):
    run_url = f"{server.url}/runs/{analysed_run.run_id}"
    assert requests.get(run_url, timeout=30).status_code == 200
    db = server.data_dir / "review.db"
    backup = server.data_dir.parent / "review.db.bak"
    shutil.move(db, backup)
    gone = requests.get(run_url, timeout=30)
    assert gone.status_code == 503 and "the file is gone" in gone.text and "<html" in gone.text
    assert not db.exists()  # no empty store put in its place
    shutil.move(backup, db)
    assert requests.get(run_url, timeout=30).status_code == 200

    broken = "f" * 32
    folder = RunLayout.for_run(broken, server.data_dir).root
    folder.mkdir(parents=True)
    (folder / "review_queue.parquet").write_bytes(b"not a parquet file")
    index = requests.get(server.url + "/", timeout=30)
    assert index.status_code == 200 and analysed_run.run_id in index.text and broken in index.text
    page = requests.get(f"{server.url}/runs/{broken}", timeout=30)
    assert page.status_code == 503 and "review_queue.parquet" in page.text

    # the same on the command line: named errors, no traceback
    listing = subprocess.run([sys.executable, "-m", "z0inf_pipeline.cli", "review", "list"],
                             env=analysed_run.env(server.data_dir), capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and broken in listing.stdout and "Traceback" not in listing.stderr
    one = subprocess.run([sys.executable, "-m", "z0inf_pipeline.cli", "review", "list", "--run", broken],
                         env=analysed_run.env(server.data_dir), capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "review_queue.parquet" in one.stderr and "Traceback" not in one.stderr


def test_an_example_id_beyond_64_bits_is_a_named_error(analysed_run, server):
    cli = subprocess.run(
        [sys.executable, "-m", "z0inf_pipeline.cli", "review", "decide", analysed_run.run_id,
         "99999999999999999999", "--action", "drop"],
        env=analysed_run.env(server.data_dir), capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 2 and "64-bit" in cli.stderr and "Traceback" not in cli.stderr
    run_url = f"{server.url}/runs/{analysed_run.run_id}"
    session = requests.Session()
    csrf = _form_token(session, run_url)
    answer = session.post(f"{run_url}/decide", timeout=30, data={
        "csrf": csrf, "reviewer": "ana", "example_id": "99999999999999999999", "action": "drop"})
    assert answer.status_code == 200 and "64-bit" in answer.text
    assert store_of(server).history(analysed_run.run_id).empty
