"""Distributed runs: a real cluster of `dask scheduler` / `dask worker` processes
on 127.0.0.1, and the LocalCluster the tool starts itself, watched over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from dask.utils import key_split

import dask_merge
from dask_merge.testing import make_dataset

pytestmark = pytest.mark.cluster


def _dask(*args: str, log: Path, prefix: list[str] = ()) -> subprocess.Popen:
    dask = shutil.which("dask") or "dask"
    return subprocess.Popen([*prefix, dask, *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start_cluster(folder: Path, workers: int = 2, worker_prefix: list[str] = ()):
    scheduler_file = folder / "scheduler.json"
    scheduler = _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                      "127.0.0.1:0", "--scheduler-file", str(scheduler_file),
                      log=folder / "scheduler.log")
    deadline = time.monotonic() + 60
    while not scheduler_file.exists():
        assert scheduler.poll() is None, (folder / "scheduler.log").read_text()
        assert time.monotonic() < deadline, "the scheduler did not start"
        time.sleep(0.1)
    worker = _dask("worker", "--scheduler-file", str(scheduler_file), "--nworkers", str(workers),
                   "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                   log=folder / "worker.log", prefix=worker_prefix)
    from distributed import Client

    with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
        client.wait_for_workers(workers, timeout=90)
        address = client.scheduler.address
    return scheduler, worker, scheduler_file, address


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    scheduler, worker, scheduler_file, address = _start_cluster(folder)
    yield address, scheduler_file
    _stop(worker, scheduler)


def _outputs(folder: Path) -> dict[str, dict]:
    return {p.name: torch.load(p) for p in sorted(folder.glob("*_merged.pt"))}


def _assert_same(left: Path, right: Path) -> None:
    ours, theirs = _outputs(left), _outputs(right)
    assert ours and ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name]["ids"] == theirs[name]["ids"]
        assert torch.equal(ours[name]["data"], theirs[name]["data"])


def test_existing_cluster_by_address_and_by_scheduler_file(cluster, dataset, tmp_path):
    address, scheduler_file = cluster
    dask_merge.run(dataset, output_dir=tmp_path / "sync", scheduler="sync", progress=False)

    by_address = dask_merge.run(dataset, output_dir=tmp_path / "address", scheduler=address,
                                progress=False)
    assert by_address.counts == {"merged": 6, "skipped": 0, "failed": 0}
    _assert_same(tmp_path / "address", tmp_path / "sync")

    report_file = tmp_path / "performance.html"
    by_file = dask_merge.run(dataset, output_dir=tmp_path / "file", scheduler_file=scheduler_file,
                             progress=False, performance_report=str(report_file))
    assert by_file.ok and by_file.counts["merged"] == 6
    _assert_same(tmp_path / "file", tmp_path / "sync")
    assert "merge-pair" in report_file.read_text()


def test_cluster_run_from_the_command_line(cluster, dataset, tmp_path):
    address, _ = cluster
    done = subprocess.run(
        [sys.executable, "-m", "dask_merge", "run", "--nucleotide-dir", str(dataset),
         "--output-dir", str(tmp_path / "out"), "--scheduler", address, "--no-progress",
         "--report", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "merged 6, skipped 0, failed 0" in done.stdout
    # --no-progress drops the bars, not where to watch the run
    assert "dask-merge: dashboard at http://" in done.stderr, done.stderr


def test_unreachable_scheduler_fails_within_seconds(dataset, tmp_path):
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(dask_merge.ConfigurationError, match=f"127.0.0.1:{port}"):
        dask_merge.run(dataset, output_dir=tmp_path / "out", scheduler=f"tcp://127.0.0.1:{port}",
                       progress=False)
    assert time.monotonic() - started < 20
    assert not list((tmp_path / "out").glob("*_merged.pt"))


def test_workers_that_cannot_see_the_inputs_are_reported(dataset, tmp_path):
    """A worker in its own mount namespace, where the data folder is an empty tmpfs."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to give a worker its own view of the file system")
    hide = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f'mount -t tmpfs tmpfs "{dataset}" && exec "$0" "$@"']
    scheduler, worker, _, address = _start_cluster(tmp_path, workers=1, worker_prefix=hide)
    try:
        with pytest.raises(dask_merge.ConfigurationError, match="workers must see the same paths"):
            dask_merge.run(dataset, output_dir=tmp_path / "out", scheduler=address, progress=False)
    finally:
        _stop(worker, scheduler)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_local_cluster_dashboard_shows_merge_tasks_over_http(tmp_path):
    features = tmp_path / "features"
    make_dataset(features, pairs=16, rows=1500)
    port = _free_port()
    result = {}
    runner = threading.Thread(target=lambda: result.update(report=dask_merge.run(
        features, output_dir=tmp_path / "out", scheduler="local", workers=2, progress=False,
        dashboard_address=f"127.0.0.1:{port}")))
    runner.start()
    seen, listening = "", set()
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
                metrics = reply.read().decode()
            listening |= {c.laddr.ip for c in psutil.net_connections("tcp")
                          if c.status == "LISTEN" and c.laddr.port == port}
        except OSError:
            time.sleep(0.05)
            continue
        if 'task_prefix_name="merge-pair"' in metrics:
            seen = metrics
            break
        time.sleep(0.05)
    runner.join(timeout=180)
    assert 'task_prefix_name="merge-pair"' in seen, "the dashboard never showed merge-pair tasks"
    assert listening == {"127.0.0.1"}, f"dashboard listens on {listening}"
    report = result["report"]
    assert report.counts["merged"] == 16 and report.dashboard.startswith(f"http://127.0.0.1:{port}")


def test_local_cluster_takes_a_free_port_when_the_dashboard_port_is_taken(dataset, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        report = dask_merge.run(dataset, output_dir=tmp_path / "out", scheduler="local",
                                workers=1, progress=False, dashboard_address=f"127.0.0.1:{port}")
    assert report.ok and report.counts["merged"] == 6
    assert report.dashboard and f":{port}/" not in report.dashboard


def _tiny_pairs(folder: Path, pairs: int = 64) -> Path:
    make_dataset(folder, pairs=pairs, rows=2, nucleotide_width=2, protein_width=2)
    return folder


def _merge_tasks(stream) -> set:
    return {task["key"] for task in stream.data if key_split(task["key"]) == "merge-pair"}


def test_tasks_are_sized_by_the_threads_of_a_given_client(tmp_path):
    """4 tasks per worker thread of the cluster, whatever `workers` says (the local cores)."""
    from distributed import Client, LocalCluster, get_task_stream

    features = _tiny_pairs(tmp_path / "features")
    with LocalCluster(n_workers=2, threads_per_worker=2, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            report = dask_merge.run(features, output_dir=tmp_path / "out", client=client,
                                    workers=1, progress=False)
    assert report.counts == {"merged": 64, "skipped": 0, "failed": 0}
    assert len(_merge_tasks(stream)) == 4 * 4  # not 4 * 1: 64 tiny pairs, 4 per task


def test_tasks_are_sized_by_the_threads_of_a_cluster_reached_by_address(cluster, tmp_path):
    from distributed import Client, get_task_stream

    address, _ = cluster
    features = _tiny_pairs(tmp_path / "features")
    with Client(address, timeout="30s") as observer, get_task_stream(observer) as stream:
        threads = sum(observer.nthreads().values())
        report = dask_merge.run(features, output_dir=tmp_path / "out", scheduler=address,
                                workers=1, progress=False)
    assert threads == 2 and report.counts["merged"] == 64
    assert len(_merge_tasks(stream)) == 4 * threads


_KEPT = "__import__('dask_merge.torchfile').torchfile.worker_read_buffers() is not None"


def test_workers_of_a_run_keep_read_buffers_and_a_shared_cluster_s_do_not(cluster, tmp_path):
    # A LocalCluster started for one run lives as long as it: its workers read
    # each pair into the memory of the last.  An existing cluster's workers
    # serve others too: their buffers go with each task.
    from distributed import Client

    from dask_merge.executors import get_executor

    local = get_executor("local", workers=2, dashboard_address="127.0.0.1:0")
    with local.started() as session:
        assert list(session.client.run(eval, _KEPT).values()) == [True, True]
    address, _ = cluster
    features = _tiny_pairs(tmp_path / "features")
    report = dask_merge.run(features, output_dir=tmp_path / "out", scheduler=address, progress=False)
    assert report.ok
    with Client(address, timeout="30s") as observer:
        assert set(observer.run(eval, _KEPT).values()) == {False}


def test_a_local_cluster_says_which_port_it_took_and_keeps_dashboard_noise_out(tmp_path):
    # The port asked for is taken, and a browser tab closes the dashboard's
    # socket as its page loads: distributed warns, and bokeh's websocket
    # handler fails with a traceback, neither of which is the run's business.
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    make_dataset(tmp_path / "features", pairs=200, rows=3, nucleotide_width=4, protein_width=4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.Popen(
            [sys.executable, "-m", "dask_merge", "run", "--nucleotide-dir", str(tmp_path / "features"),
             "--output-dir", str(tmp_path / "out"), "--scheduler", "local", "--workers", "1",
             "--partition-size", "1", "--no-progress", "--dashboard-address", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = run.stderr.readline()
            link = run.stderr.readline()
            assert "pairs to merge" in first and "dashboard at" in link, first + link
            assert f"(port {port} was taken)" in link
            page = link.split("dashboard at ")[1].split()[0]

            async def close_as_it_loads():
                socket_ = await websocket_connect(page.replace("http:", "ws:") + "/ws")
                socket_.close()

            IOLoop.current().run_sync(close_as_it_loads, timeout=30)
            out, err = run.communicate(timeout=240)
        finally:
            run.kill()
    assert run.returncode == 0, err
    assert "merged 200, skipped 0, failed 0" in out
    for noise in ("already in use", "Uncaught exception", "Traceback"):
        assert noise not in err, err
