"""Overlapping promotions lose nothing: both decisions are logged, LATEST is the better run's.

The race is made deterministic with `job.promotion.gate.decided`, the seam called after each decision and
before any of it is written: both promotions read LATEST and decide before either writes; then
the one called `first` writes and finishes while `second` waits, and `second` writes against what
it read, loses, reads again and decides again. Locally and against the S3 server on loopback.

Runs are real (one tiny training run, copied); their stored `eval.json` is given the
fid_classifier each test needs, as tests/test_promote.py does, so that which run is better is
known and nothing is evaluated twice.
"""

import argparse
import json
import shutil
import threading
import uuid

import pytest

import job.storage.pointer
import job.promotion.gate
from job.storage.checkpoint import checkpoint_folders
from job.errors import UsageError
from job.commands.evaluate import add_evaluate_arguments
from job.promotion.evaluation import prepare_evaluator
from job.storage.pointer import PreconditionFailed, Store
from job.commands.promote import add_promote_arguments
from job.storage.location import resolve_location
from tests.conftest import parse_jsonl, train_one_process

NUM = "64"  # generated images per evaluation: enough for the numbers, quick on a CPU
GOOD, BAD, WORST = 10.0, 20.0, 30.0  # fid_classifier of the runs (lower is better)


# -- small real runs (small_fashion_dir comes from conftest.py) --


@pytest.fixture(scope="session")
def classifier_cache(small_fashion_dir, tmp_path_factory):
    """A user cache holding the classifier that `evaluate` and `promote` train on the small data, trained once."""
    cache = tmp_path_factory.mktemp("classifier-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        prepare_evaluator("fashion-mnist", str(small_fashion_dir), None)
    return cache


@pytest.fixture(scope="session")
def template_run(small_fashion_dir, classifier_cache, tmp_path_factory):
    """One finished one-epoch run with its stored evaluation, made once; tests copy it."""
    folder = train_one_process(tmp_path_factory.mktemp("template") / "runs", small_fashion_dir, "r1", limit=64)
    run = resolve_location(str(folder))
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(["--from", run.uri, "--data-dir", str(small_fashion_dir), "--num", NUM])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(classifier_cache))
        args.handler(args)
    return run


@pytest.fixture
def runs(tmp_path, template_run, classifier_cache, isolated_home, capsys):
    """A storage folder with finished runs `good`, `bad` and `worst` (fid_classifier GOOD < BAD < WORST)."""
    shutil.copytree(classifier_cache, isolated_home, dirs_exist_ok=True)
    for name, fid in (("good", GOOD), ("bad", BAD), ("worst", WORST)):
        shutil.copytree(template_run.path, tmp_path / "runs" / name)
        set_stored_fid(str(tmp_path / "runs" / name), fid)
    capsys.readouterr()
    return tmp_path / "runs"


def set_stored_fid(run_uri, fid, s3_endpoint=None):
    """Give the run's stored evaluation (same protocol as promote's) another fid_classifier."""
    run = resolve_location(run_uri, s3_endpoint)
    stored = json.loads(run.child("artifacts", "eval.json").read_text())
    stored.update(source=checkpoint_folders(run)[0].uri, fid_classifier=fid)
    run.child("artifacts", "eval.json").write_text(json.dumps(stored))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request, runs, tmp_path):
    """Where the runs and LATEST live: `uri(name)` of a run, `target`, `endpoint`, and reads of LATEST and the log."""
    if request.param == "local":
        return Place(str(runs), None)
    s3 = request.getfixturevalue("s3_server")
    prefix = f"race-{uuid.uuid4().hex[:8]}"
    s3.upload(runs, prefix)
    place = Place(f"s3://{s3.bucket}/{prefix}", s3.url)
    for name, fid in (("good", GOOD), ("bad", BAD), ("worst", WORST)):
        set_stored_fid(place.uri(name), fid, s3.url)  # its checkpoint's S3 URI
    return place


class Place:
    def __init__(self, root, endpoint):
        self.root, self.endpoint = root, endpoint
        self.target = f"{root}/job/LATEST"

    def uri(self, name):
        return f"{self.root}/{name}"

    def read(self, name):
        versioned = Store(self.endpoint).read(resolve_location(f"{self.root}/job/{name}", self.endpoint))
        return versioned.data

    def latest(self):
        return json.loads(self.read("LATEST"))

    def log(self):
        return parse_jsonl(self.read("promotions.jsonl"))

    def args(self, name, *extra):
        parser = argparse.ArgumentParser()
        add_promote_arguments(parser)
        argv = ["--run", self.uri(name), "--target", self.target, "--num", NUM, "--margin", "0", *extra]
        return parser.parse_args(argv + (["--s3-endpoint", self.endpoint] if self.endpoint else []))


def promote(place, name, small_fashion_dir, *extra):
    args = place.args(name, "--data-dir", str(small_fashion_dir), *extra)
    return args.handler(args)


def overlapped(monkeypatch, place, first, second, small_fashion_dir):
    """Promote runs `first` and `second` at once: both decide before either writes,
    then `first` writes and finishes first.

    Returns both exit statuses and every decision each made, in order (a lost race makes two).
    """
    both_decided, first_done = threading.Barrier(2, timeout=120), threading.Event()
    decisions = {first: [], second: []}

    def decided(decision):
        name = decision["run"].rsplit("/", 1)[1]
        decisions[name].append(dict(decision))
        if decision["attempt"] == 1:
            both_decided.wait()  # both have read LATEST and decided
            if name == second:
                assert first_done.wait(120)

    monkeypatch.setattr(job.promotion.gate, "decided", decided)
    statuses = {}

    def promote_in_thread(name):
        try:
            statuses[name] = promote(place, name, small_fashion_dir)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            statuses[name] = err
            both_decided.abort()
        finally:
            if name == first:
                first_done.set()

    threads = [threading.Thread(target=promote_in_thread, args=(name,)) for name in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert statuses == {first: 0, second: 0}
    return decisions


def assert_serial(log, latest):
    """The log reads as decisions made one after the other, each against the LATEST the ones before it left;
    LATEST is the last promoted."""
    current = None
    for entry in log:
        assert entry.get("current_run") == (current or {}).get("run"), entry
        assert entry.get("current_decision") == (current or {}).get("id"), entry
        if entry["promoted"]:
            current = entry
    assert latest["run"] == current["run"] and latest["decision"] == current


@pytest.mark.parametrize(
    "first, second", [("bad", "good"), ("good", "bad")], ids=["worse-writes-first", "better-writes-first"]
)
def test_two_overlapping_promotions_keep_both_decisions_and_latest_at_the_better_run(
    where, first, second, small_fashion_dir, monkeypatch
):
    decisions = overlapped(monkeypatch, where, first, second, small_fashion_dir)

    # Both read "no LATEST yet" and decided to promote; the first wrote, the second lost and decided again.
    assert [(d["attempt"], d["promoted"], d.get("current_run")) for d in decisions[first]] == [(1, True, None)]
    winner = where.log()[0]
    assert [(d["attempt"], d.get("current_run"), d.get("current_decision")) for d in decisions[second]] == [
        (1, None, None), (2, where.uri(first), winner["id"]),
    ]  # fmt: skip
    assert decisions[second][1]["promoted"] is (second == "good")

    # Both decisions are in the log, as the two would have run one after the other, and LATEST is at the better run.
    log, latest = where.log(), where.latest()
    assert [(e["run"], e["promoted"]) for e in log] == [(where.uri(first), True), (where.uri(second), second == "good")]
    assert [e["id"] for e in log] == [decisions[first][0]["id"], decisions[second][1]["id"]]
    assert latest["run"] == where.uri("good") and latest["fid_classifier"] == GOOD
    assert_serial(log, latest)


def test_two_overlapping_refusals_are_both_logged_and_latest_is_left_alone(
    where, small_fashion_dir, monkeypatch, capsys
):
    assert promote(where, "good", small_fashion_dir) == 0
    before = where.read("LATEST")
    decisions = overlapped(monkeypatch, where, "bad", "worst", small_fashion_dir)

    # Both appended to the log read before either wrote: the second's append lost, and it decided again.
    assert [d["attempt"] for d in decisions["bad"]] == [1] and [d["attempt"] for d in decisions["worst"]] == [1, 2]
    log = where.log()
    assert [(e["run"], e["promoted"]) for e in log] == [(where.uri(n), n == "good") for n in ("good", "bad", "worst")]
    assert where.read("LATEST") == before
    assert_serial(log, where.latest())


def test_a_promotion_that_dies_between_latest_and_the_log_is_logged_by_the_next_one(
    runs, small_fashion_dir, monkeypatch
):
    place = Place(str(runs), None)

    def die(*_):
        raise KeyboardInterrupt  # killed after LATEST was replaced, before its log line was written

    monkeypatch.setattr(job.promotion.gate, "log_promotion", die)
    with pytest.raises(KeyboardInterrupt):
        promote(place, "bad", small_fashion_dir)
    monkeypatch.undo()
    assert (
        place.latest()["run"] == place.uri("bad") and place.read("promotions.jsonl") is None
    )  # LATEST carries the decision

    assert promote(place, "good", small_fashion_dir) == 0
    log = place.log()
    assert [(e["run"], e["promoted"]) for e in log] == [(place.uri("bad"), True), (place.uri("good"), True)]
    assert_serial(log, place.latest())


def test_a_write_that_landed_although_its_reply_was_lost_is_not_repeated(runs, small_fashion_dir, monkeypatch):
    """As when a PUT times out after S3 stored it and its retry fails its own If-None-Match."""
    place, real_write, lost = Place(str(runs), None), Store.write, []

    def write_then_lose_the_reply(self, location, data, token):
        real_write(self, location, data, token)
        if location.path.endswith("LATEST") and not lost:
            lost.append(location.uri)
            raise PreconditionFailed(location.uri)

    monkeypatch.setattr(Store, "write", write_then_lose_the_reply)
    assert promote(place, "good", small_fashion_dir) == 0
    log = place.log()
    assert lost and len(log) == 1 and log[0]["attempt"] == 1 and place.latest()["decision"] == log[0]


def test_a_promotion_that_keeps_losing_gives_up_with_one_line_and_writes_nothing(
    runs, small_fashion_dir, monkeypatch, capsys
):
    place = Place(str(runs), None)
    assert promote(place, "bad", small_fashion_dir) == 0
    latest = runs / "job" / "LATEST"

    def another_writer_moves_latest(decision):
        pointer = json.loads(latest.read_text())
        pointer["promoted_at"] = uuid.uuid4().hex  # a hand edit between every read and write
        latest.write_text(json.dumps(pointer))

    monkeypatch.setattr(job.promotion.gate, "decided", another_writer_moves_latest)
    capsys.readouterr()
    assert promote(place, "good", small_fashion_dir) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and f"lost the race for {place.target} 5 times" in err
    assert [e["run"] for e in place.log()] == [place.uri("bad")] and place.latest()["run"] == place.uri("bad")


# -- the primitive, and stores that ignore it ------------------------------------------------


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_conditional_write_fails_when_the_object_changed_since_it_was_read(kind, tmp_path, request):
    if kind == "local":
        location, store = resolve_location(str(tmp_path / "job" / "LATEST")), Store()
    else:
        s3 = request.getfixturevalue("s3_server")
        location, store = resolve_location(f"s3://{s3.bucket}/cas-{uuid.uuid4().hex[:8]}/LATEST", s3.url), Store(s3.url)
    assert store.read(location) == job.storage.pointer.Versioned(None, None)
    store.write(location, b"one", None)  # first write: only if there is none
    with pytest.raises(PreconditionFailed):
        store.write(location, b"two", None)
    one = store.read(location)
    assert one.data == b"one"
    store.write(location, b"two", one.token)
    with pytest.raises(PreconditionFailed):
        store.write(location, b"three", one.token)  # stale: read before "two"
    assert store.read(location).data == b"two"


class IgnoresConditions:
    """A mock, used only to stand for an S3 store that ignores If-Match and If-None-Match:
    a real client whose PUTs drop them."""

    def __init__(self, client):
        self.client = client

    def put_object(self, **kwargs):
        kwargs.pop("IfMatch", None), kwargs.pop("IfNoneMatch", None)
        return self.client.put_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.mark.s3
def test_an_s3_store_that_ignores_conditional_writes_is_refused_before_anything_is_written(
    runs, s3_server, small_fashion_dir, monkeypatch
):
    """A UsageError is one line on stderr and exit status 2 (job.cli.main)."""
    import job.storage.s3_preflight

    real_client = job.storage.s3_preflight.s3_client
    monkeypatch.setattr(job.storage.s3_preflight, "s3_client", lambda *a, **k: IgnoresConditions(real_client(*a, **k)))
    prefix = f"ignores-{uuid.uuid4().hex[:8]}"
    s3_server.upload(runs / "good", f"{prefix}/good")

    def keys():
        return set(s3_server.keys(prefix + "/"))

    before, place = keys(), Place(f"s3://{s3_server.bucket}/{prefix}", s3_server.url)
    with pytest.raises(UsageError) as refused:
        promote(place, "good", small_fashion_dir)
    message = str(refused.value)
    assert message.startswith(f"--target {place.target}: ") and "\n" not in message
    assert f"the S3 store at {s3_server.url} ignores conditional writes" in message and "MinIO" in message
    assert keys() == before  # no LATEST, no log, no eval.json, no probe left behind


def test_a_file_system_that_ignores_locks_is_refused_before_anything_is_written(runs, small_fashion_dir, monkeypatch):
    """`fcntl.flock` made a no-op in this process stands for a file system whose locks do nothing."""
    monkeypatch.setattr(job.storage.pointer.fcntl, "flock", lambda *a: None)
    place, stored = Place(str(runs), None), (runs / "good" / "artifacts" / "eval.json").read_bytes()
    with pytest.raises(UsageError) as refused:
        promote(place, "good", small_fashion_dir)
    message = str(refused.value)
    assert (
        message.startswith(f"--target {place.target}: ")
        and "does not enforce file locks" in message
        and "\n" not in message
    )
    assert not (runs / "job").exists()  # no LATEST, no log, no probe, not even its folder left behind
    assert (runs / "good" / "artifacts" / "eval.json").read_bytes() == stored  # nothing evaluated
