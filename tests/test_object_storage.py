"""Object storage (gs://) for data, workdirs and every CLI, against a real GCS API on localhost
(fake-gcs-server, tests/gcs.py), pointed at by the standard variables only.

The slow tests share one bucket: a reference run trains on webdataset shards and a CSV in the
bucket with its workdir there; a second run is killed with SIGKILL after its first checkpoint
and rerun while the server goes away for a few seconds; the rerun's losses must equal the
reference run's bit for bit, and every CLI reads the bucket workdir.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmjax import storage
from mmjax.data.image_corpus import write_image_corpus, write_wds_shards
from mmjax.data.sources import absolute_spec
from tests.gcs import FakeGcs
from tests.runs import xla_flags

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
OUTAGE_SECONDS = 6
TRAIN = [
    "--config", "configs/coca.py:size=tiny,batch=16",
    f"--config.total_steps={STEPS}",
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.eval_every=1000",
    "--config.optimizer.warmup_steps=0",
    "--config.eval.batch_size=32",
    "--config.eval.caption_examples=8",
    "--config.data.tokenizer_vocab_size=96",
    "--config.model.vision.layers=1",
    "--config.model.text.layers=1",
    "--config.model.decoder.layers=1",
    "--config.data.train=wds:gs://bkt/data/wds_train/{000000..000001}.tar",
    "--config.data.eval=csv:gs://bkt/data/eval.csv",
]  # fmt: skip


# --- without a server ----------------------------------------------------------------------


def test_paths_local_and_remote():
    assert storage.path("runs/a") == Path(os.path.abspath("runs/a"))
    remote = storage.path("gs://bkt/runs/a")
    assert str(remote / "metrics.jsonl") == "gs://bkt/runs/a/metrics.jsonl"
    assert storage.is_remote(remote) and not storage.is_remote(Path("/tmp"))
    with pytest.raises(storage.StorageError, match=r"^ftp://x/y: scheme ftp:// is not supported"):
        storage.path("ftp://x/y")
    assert absolute_spec("wds:gs://b/s-{0..3}.tar") == "wds:gs://b/s-{0..3}.tar"
    assert absolute_spec("csv:a.csv") == f"csv:{os.path.abspath('a.csv')}"


class _Status(Exception):
    def __init__(self, code):
        super().__init__(f"HTTP {code}")
        self.code = code


@pytest.mark.parametrize(
    "error, expected",
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("slow"), True),
        (_Status(503), True),
        (_Status(429), True),
        (_Status(404), False),
        (FileNotFoundError("gs://b/x"), False),
        (PermissionError("denied"), False),
        (ValueError("bad"), False),
    ],
)
def test_transient_errors(error, expected):
    assert storage.transient(error) is expected


def test_retry_rides_out_transient_errors_and_counts_them():
    failures = [ConnectionResetError("reset"), _Status(502)]

    def flaky():
        if failures:
            raise failures.pop(0)
        return "ok"

    before = storage.retries()
    assert storage.retry(flaky, "test") == "ok"
    assert storage.retries() == before + 2
    with pytest.raises(FileNotFoundError):  # Not transient: at once.
        storage.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), "test")
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):  # Transient, but past the budget.
        storage.retry(lambda: (_ for _ in ()).throw(ConnectionRefusedError()), "t", budget=1.0)
    assert time.monotonic() - start < 3


# --- against the server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = FakeGcs(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


def _env(gcs, cache_dir):
    return dict(
        os.environ,
        **gcs.env,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(1),
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _mmjax(gcs, cache_dir, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "mmjax", *map(str, args)],
        cwd=REPO, env=_env(gcs, cache_dir), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _ok(proc):
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _upload(gcs, local: Path, remote: str) -> None:
    """What `gsutil cp -r` does, through gcsfs in a subprocess (this process keeps no
    emulator settings)."""
    code = (
        "import fsspec, sys; "
        "fsspec.filesystem('gs').put(sys.argv[1].rstrip('/') + '/', sys.argv[2], recursive=True)"
    )
    env = dict(os.environ, **gcs.env)
    subprocess.run(
        [sys.executable, "-c", code, str(local), remote], env=env, check=True, timeout=120
    )


@pytest.fixture(scope="module")
def bucket_data(gcs, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train_csv = write_image_corpus(root, num_examples=64, image_size=40, split="train")
    write_image_corpus(root, num_examples=32, image_size=40, split="eval")
    write_wds_shards(train_csv, root / "wds_train", shard_size=32)
    _upload(gcs, root, "bkt/data")
    return root


def _losses(gcs, workdir: str) -> dict[int, float]:
    local = gcs.root / workdir.removeprefix("gs://")
    records = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def reference(gcs, bucket_data, cache_dir):
    """An uninterrupted run on bucket data, its workdir in the bucket."""
    workdir = "gs://bkt/runs/reference"
    proc = _ok(_mmjax(gcs, cache_dir, "train", *TRAIN, "--workdir", workdir))
    return workdir, proc


@pytest.mark.slow
def test_a_run_in_the_bucket_stores_everything_there(gcs, reference):
    workdir, proc = reference
    assert "done: metrics in gs://bkt/runs/reference/metrics.jsonl" in proc.stdout
    objects = gcs.objects()
    for name in ("config.json", "metrics.jsonl", "runs.jsonl", "tokenizer.model"):
        assert f"runs/reference/{name}" in objects
    assert "runs/reference/checkpoints/8/commit_success.txt" in objects
    assert any(o.startswith("runs/reference/tensorboard/events.out.tfevents") for o in objects)
    assert "runs/reference/.lock" not in objects  # Released at the end.
    assert sorted(_losses(gcs, workdir)) == list(range(1, STEPS + 1))
    records = (gcs.root / "bkt/runs/reference/metrics.jsonl").read_text().splitlines()
    train = [json.loads(r) for r in records if '"loss"' in r]
    assert {r["storage_retries"] for r in train} == {0.0}  # Counted; none was needed.
    assert not Path(REPO / "gs:").exists()  # No URL was ever taken for a local path.


@pytest.mark.slow
def test_every_cli_reads_a_bucket_workdir(gcs, reference, bucket_data, cache_dir, tmp_path):
    workdir, _ = reference
    _ok(_mmjax(gcs, cache_dir, "evaluate", "--workdir", workdir))
    evaluated = json.loads((gcs.root / "bkt/runs/reference/eval.json").read_text())
    assert 0 <= evaluated["eval/i2t_r1"] <= 1
    assert "runs/reference/eval/captioning/captions_8.jsonl" in gcs.objects()
    _ok(_mmjax(gcs, cache_dir, "plot", "--workdir", workdir))
    assert "runs/reference/curves.png" in gcs.objects()
    image = "gs://bkt/data/images/eval/000000.jpg"
    captioned = _ok(_mmjax(gcs, cache_dir, "caption", "--workdir", workdir, image))
    assert captioned.stdout.startswith(image + "\t")
    index = tmp_path / "index"
    _ok(_mmjax(gcs, cache_dir, "search", "index", "--workdir", workdir,
               bucket_data / "images" / "eval", "--out", index))  # fmt: skip
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["workdir"] == workdir


@pytest.mark.slow
def test_kill_9_and_a_server_outage_lose_nothing(gcs, reference, cache_dir):
    """SIGKILL after the first checkpoint, then a rerun whose server goes away for
    OUTAGE_SECONDS once it has resumed and compiled (while it reads its shards): the run
    retries, finishes, and its losses are the uninterrupted run's, bit for bit."""
    workdir = "gs://bkt/runs/killed"
    ckpt = gcs.root / "bkt/runs/killed/checkpoints/4/commit_success.txt"
    process = subprocess.Popen(
        [sys.executable, "-m", "mmjax", "train", *TRAIN, "--workdir", workdir,
         "--config.train.on_nan=halt"],
        cwd=REPO, env=_env(gcs, cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not ckpt.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0].decode(errors="replace")
    assert ckpt.exists(), output[-3000:]
    # The rerun: the server goes away once the rerun has resumed, and comes back.
    rerun = subprocess.Popen(
        [sys.executable, "-m", "mmjax", "train", *TRAIN, "--workdir", workdir,
         "--config.train.on_nan=halt"],
        cwd=REPO, env=_env(gcs, cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    lines, stepping = [], threading.Event()

    def read():
        for line in rerun.stdout:
            lines.append(line)
            if "compiled in" in line:  # Resumed and compiled: the data reads start now.
                stepping.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert stepping.wait(300), "".join(lines)[-3000:]
    gcs.stop()
    time.sleep(OUTAGE_SECONDS)
    gcs.start()
    rerun.wait(timeout=600)
    reader.join(timeout=10)
    output = "".join(lines)
    assert rerun.returncode == 0, output[-4000:]
    assert "took over the stale lock" in output  # The killed run's lock, its process gone.
    assert f"resumed from {workdir}/checkpoints/4" in output
    assert _losses(gcs, workdir) == _losses(gcs, reference[0])
    # The shard reads that met the outage were retried, counted in the metrics and logged.
    records = (gcs.root / "bkt/runs/killed/metrics.jsonl").read_text().splitlines()
    retried = [json.loads(r).get("storage_retries", 0) for r in records]
    assert max(retried) > 0 and "retrying" in output, output[-3000:]


@pytest.mark.slow
def test_missing_bucket_and_object_are_one_line(gcs, bucket_data, cache_dir):
    proc = _mmjax(gcs, cache_dir, "train", *TRAIN, "--workdir", "gs://nobucket/run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --workdir gs://nobucket/run: bucket 'nobucket' does not exist"
    )
    proc = _mmjax(
        gcs, cache_dir, "train", *TRAIN, "--workdir", "gs://bkt/runs/missing",
        "--config.data.train=csv:gs://bkt/data/nothing.csv",
    )  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.train: ") and "gs://bkt/data/nothing.csv" in last
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr  # No traceback.


ARRAYRECORD_CHECK = r"""
import json, sys
from mmjax.data.sources import make_source
local, remote = (make_source(spec, split="train", data={}, image_size=40) for spec in sys.argv[1:])
same = all(local[i]["image"] == remote[i]["image"] and local[i]["caption"] == remote[i]["caption"]
           for i in range(len(local)))
print(json.dumps(dict(n=len(remote), same=same, paths=remote.paths)))
"""


@pytest.mark.slow
def test_arrayrecord_shards_in_the_bucket_read_through_a_local_copy(gcs, bucket_data, tmp_path):
    """array_record opens local files only: the shards are copied once into the local object
    cache (one per object generation) and read from there, record for record."""
    from mmjax.data.arrayrecord_source import write_arrayrecord_shards
    from mmjax.data.sources import make_source

    local = tmp_path / "ar"
    source = make_source(f"csv:{bucket_data / 'train.csv'}", split="train", data={}, image_size=40)
    write_arrayrecord_shards(source, local, num_shards=2)
    _upload(gcs, local, "bkt/data/ar")
    cache = tmp_path / "cache"
    env = dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu", MMJAX_CACHE=str(cache))
    specs = [f"arrayrecord:{local}/*.array_record", "arrayrecord:gs://bkt/data/ar/*.array_record"]
    for _ in range(2):  # The second time from the cache.
        proc = subprocess.run(
            [sys.executable, "-c", ARRAYRECORD_CHECK, *specs],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["n"] == 64 and result["same"]
        assert all(p.startswith(str(cache / "objects")) for p in result["paths"])
    assert len(list((cache / "objects").iterdir())) == 2
