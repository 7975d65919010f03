"""The launch scripts (launch/scripts/{tpu,gpu,local}.sh).

With DRY_RUN=1 each script prints, one per line and shell-quoted, the commands it would run;
`shlex.split` reads each line back into an argv, which the tests check flag by flag. The
remote command lines (what gcloud or ssh would run on a worker) are then run here, by bash,
with a stub `python` that records its argv, environment, directory and pid: so the quoting,
the detaching, the pid files and the per-process variables are checked as a shell executes
them, not as text. local.sh's multiprocess mode is run for real with the stub, including
the failure path (one process fails, the others get SIGTERM).
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "launch" / "scripts"
CONFIG = "configs/vdm/cifar10.py"

# A stand-in for `python`: writes {argv, cwd, pid, env} to $STUB_OUT/<PROCESS_ID>.json, then
# exits (STUB_MODE=exit), exits with 3 if it is process 1 (fail1), or sleeps until SIGTERM,
# which it records in <PROCESS_ID>.term (sleep).
STUB = f"""#!{sys.executable}
import json, os, signal, sys, time
out, key = os.environ["STUB_OUT"], os.environ.get("PROCESS_ID", "single")
def record(name, value):
  tmp = os.path.join(out, name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(value, f)
  os.replace(tmp, os.path.join(out, name))
def on_term(*_):
  record(key + ".term", True)
  sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
keys = ["COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "XLA_FLAGS", "JAX_PLATFORMS",
        "TFDS_DATA_DIR"]
record(key + ".json", dict(argv=sys.argv[1:], cwd=os.getcwd(), pid=os.getpid(),
                           env={{k: os.environ.get(k) for k in keys}}))
mode = os.environ.get("STUB_MODE", "exit")
if mode == "fail1" and key == "1":
  time.sleep(0.3)
  sys.exit(3)
if mode in ("sleep", "fail1"):
  time.sleep(30)
"""


def script(name, *args, env=None, dry=True):
  """Runs launch/scripts/<name> with bash in a clean environment; returns CompletedProcess."""
  full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
  if dry:
    full["DRY_RUN"] = "1"
  full.update(env or {})
  return subprocess.run(["bash", str(SCRIPTS / name), *args], env=full, capture_output=True,
                        text=True, timeout=30)


def commands(result):
  """The printed commands as argv lists, after checking the script succeeded."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def flag(argv, name):
  """Value of `--name=value` in argv (exactly one occurrence)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def env_of(argv):
  """For an `env A=1 B=2 cmd ...` argv: ({A: 1, B: 2}, [cmd, ...])."""
  assert argv[0] == "env", argv
  i = 1
  while "=" in argv[i] and not argv[i].startswith("-"):
    i += 1
  return dict(a.split("=", 1) for a in argv[1:i]), argv[i:]


def wait_for(path, timeout=10.0):
  deadline = time.time() + timeout
  while not path.exists():
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)
  return json.loads(path.read_text())


@pytest.fixture
def stub(tmp_path):
  """(path of the stub python, folder it records into)."""
  out = tmp_path / "records"
  out.mkdir()
  path = tmp_path / "bin" / "python"
  path.parent.mkdir()
  path.write_text(STUB)
  path.chmod(0o755)
  return path, out


def remote(command, env, check=True):
  """Runs a remote command line as a worker's login shell would (bash -c)."""
  result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=30)
  if check:
    assert result.returncode == 0, result.stderr
  return result


# --- every script ---

@pytest.mark.parametrize("name", ["tpu.sh", "gpu.sh", "local.sh"])
def test_syntax_and_unknown_subcommand(name):
  assert subprocess.run(["bash", "-n", str(SCRIPTS / name)]).returncode == 0
  for args in (["frobnicate"], []):
    result = script(name, *args)
    assert result.returncode != 0
    assert "Usage:" in result.stderr and result.stdout == ""
  assert "unknown subcommand 'frobnicate'" in script(name, "frobnicate").stderr
  assert "Usage:" in script(name, "--help").stdout


@pytest.mark.parametrize("name,args", [
    ("tpu.sh", ["train", "configs/vdm/nope.py"]),
    ("gpu.sh", ["train", "configs/vdm/nope.py", "/tmp/w"]),
    ("local.sh", ["multiprocess", "2", "configs/vdm/nope.py", "/tmp/w"]),
])
def test_missing_config_is_an_error(name, args):
  env = dict(TPU_NAME="t", ZONE="z", WORKDIR="gs://b/w")
  result = script(name, *args, env=env)
  assert result.returncode != 0 and "configs/vdm/nope.py not found" in result.stderr


# --- tpu.sh ---

TPU_ENV = dict(TPU_NAME="my-tpu", ZONE="us-central2-b", PROJECT="my-proj",
               ACCELERATOR_TYPE="v4-32", WORKDIR="gs://bucket/run",
               TFDS_DATA_DIR="gs://bucket/tfds", REPO_URL="https://example.com/vdiff.git")


def tpu(*args, **env):
  return commands(script("tpu.sh", *args, env={**TPU_ENV, **env}))


def assert_ssh_all(argv, worker="all"):
  """A `gcloud compute tpus tpu-vm ssh` to the node; returns its --command."""
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert flag(argv, "--zone") == "us-central2-b" and flag(argv, "--project") == "my-proj"
  assert flag(argv, "--worker") == worker
  return flag(argv, "--command")


def test_tpu_create_queued_spot_vm_and_runtime_defaults():
  (argv,) = tpu("create")
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
  assert flag(argv, "--node-id") == "my-tpu"
  assert flag(argv, "--accelerator-type") == "v4-32"
  assert flag(argv, "--runtime-version") == "tpu-ubuntu2204-base"
  assert "--spot" not in argv
  (argv,) = tpu("create", "--reserved", SPOT="1", ACCELERATOR_TYPE="v5litepod-16")
  assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert "--spot" in argv and argv[-1] == "--reserved"
  (argv,) = tpu("create", CREATE_MODE="vm", ACCELERATOR_TYPE="v6e-8", RUNTIME_VERSION="custom")
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
  assert flag(argv, "--version") == "custom"
  result = script("tpu.sh", "create", env={**TPU_ENV, "ACCELERATOR_TYPE": "v9-1"})
  assert result.returncode != 0 and "RUNTIME_VERSION" in result.stderr


def test_tpu_missing_env_and_local_workdir_are_errors():
  env = {k: v for k, v in TPU_ENV.items() if k != "TPU_NAME"}
  result = script("tpu.sh", "train", CONFIG, env=env)
  assert result.returncode != 0 and "TPU_NAME is not set" in result.stderr
  result = script("tpu.sh", "train", CONFIG, env={**TPU_ENV, "WORKDIR": "/tmp/run"})
  assert result.returncode != 0 and "gs://" in result.stderr


def test_tpu_train_runs_the_entry_point_detached_on_every_worker(tmp_path, stub):
  (argv,) = tpu("train", CONFIG, "--config.name=a b", "--config.lr=1e-3")
  command = assert_ssh_all(argv)
  assert f"python -m launch.train --config {CONFIG} --workdir gs://bucket/run" in command

  # Run it as a worker would: HOME holds the checkout and the venv.
  home = tmp_path / "home"
  (home / "vdiff").mkdir(parents=True)
  (home / "vdiff-venv" / "bin").mkdir(parents=True)
  os.symlink(stub[0], home / "vdiff-venv" / "bin" / "python")
  env = {"PATH": os.environ["PATH"], "HOME": str(home), "STUB_OUT": str(stub[1]),
         "STUB_MODE": "sleep"}
  remote(command, env)
  rec = wait_for(stub[1] / "single.json")
  pid_file = home / "vdiff-logs" / "train.pid"
  try:
    assert rec["argv"] == ["-m", "launch.train", "--config", CONFIG, "--workdir",
                           "gs://bucket/run", "--config.name=a b", "--config.lr=1e-3"]
    assert rec["cwd"] == str(home / "vdiff")
    assert rec["env"]["TFDS_DATA_DIR"] == "gs://bucket/tfds"
    assert int(pid_file.read_text()) == rec["pid"]
    assert "=== " in (home / "vdiff-logs" / "train.log").read_text()
    # A second start while it runs is refused.
    again = remote(command, env, check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    # status sees it; stop sends SIGTERM (the trainer's cue to save and exit).
    status = tpu("status")
    assert status[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]
    assert "train running (pid %d)" % rec["pid"] in remote(assert_ssh_all(status[1]), env).stdout
    (stop,) = tpu("stop")
    remote(assert_ssh_all(stop), env)
    assert wait_for(stub[1] / "single.term") is True
  finally:
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (OSError, ValueError):
      pass


def test_tpu_evaluate_sample_logs():
  (argv,) = tpu("evaluate")
  assert "python -m launch.evaluate --workdir gs://bucket/run >>" in assert_ssh_all(argv)
  (argv,) = tpu("sample", "--num", "64", "--steps", "256")
  assert ("python -m launch.sample --workdir gs://bucket/run --num 64 --steps 256 >>"
          in assert_ssh_all(argv))
  (argv,) = tpu("logs")
  assert assert_ssh_all(argv, worker="0") == "tail -n 200 -F ~/vdiff-logs/train.log"
  (argv,) = tpu("logs", "sample", WORKER="3")
  assert assert_ssh_all(argv, worker="3").endswith("~/vdiff-logs/sample.log")


def test_tpu_install_runs_the_worker_script_of_the_checkout():
  (argv,) = tpu("install")
  command = assert_ssh_all(argv)
  assert command == "bash ~/vdiff/launch/scripts/tpu_vm_install.sh ~/vdiff-venv ~/vdiff"
  (argv,) = tpu("install", BASE_PYTHON="/opt/py 3.11/bin/python3")
  assert assert_ssh_all(argv) == f"BASE_PYTHON='/opt/py 3.11/bin/python3' {command}"
  # The worker installs the checkout's `tpu` extra: the same jax as the main requirement.
  setup = (REPO / "setup.py").read_text()
  pin = re.search(r'"jax==([0-9.]+)"', setup).group(1)
  assert re.search(r'"tpu": \["jax\[tpu\]==([0-9.]+)"', setup).group(1) == pin
  assert "uv" not in re.findall(r"[a-z]+", (SCRIPTS / "tpu_vm_install.sh").read_text())


# A stand-in for a TPU VM image: python3 of a given version (ensurepip present or not),
# apt-get that can install python3.11 / pythonX.Y-venv (or has no python3.11), sudo, and a
# non-root `id`. Every call is logged to $LOG, one line each.
FAKE_PYTHON = """#!{bash}
echo "${{0##*/}} $*" >> "$LOG"
case "$1 $2" in
  "-c import sys"*) echo {version} ;;
  "-c import ensurepip"*) [ -e "$FAKE/venv-ok-{version}" ] ;;
  "-m venv") mkdir -p "$3/bin"; printf '#!{bash}\necho "venv-python $*" >> "$LOG"\n' > "$3/bin/python"
             chmod +x "$3/bin/python" ;;
esac
"""
FAKE_APT = """#!{bash}
echo "apt-get $*" >> "$LOG"
[ "$3" = install ] || exit 0   # apt-get -o DPkg::Lock::Timeout=300 install -y -qq PACKAGES
for package in "${{@:6}}"; do
  case $package in
    python3.11) [ "$APT_HAS_PYTHON311" = 1 ] || {{ echo "E: Unable to locate package python3.11" >&2; exit 100; }}
                cp "$FAKE/python-3.11" "$FAKE/bin/python3.11" ;;
    python*-venv) v=${{package#python}}; touch "$FAKE/venv-ok-${{v%-venv}}" ;;
  esac
done
"""


def fake_tpu_vm(tmp_path, python3="3.10", python3_venv=True, apt_python311=True):
  """(env, home, log): a worker whose PATH holds only the fakes and the tools bash needs."""
  fake, home = tmp_path / "fake", tmp_path / "home"
  (fake / "bin").mkdir(parents=True)
  (home / "vdiff" / "launch" / "scripts").mkdir(parents=True)
  (home / "vdiff" / "setup.py").write_text("")
  script = home / "vdiff" / "launch" / "scripts" / "tpu_vm_install.sh"
  script.write_text((SCRIPTS / "tpu_vm_install.sh").read_text())
  bash = shutil.which("bash")
  for tool in ("bash", "mkdir", "chmod", "cp", "touch"):
    os.symlink(shutil.which(tool), fake / "bin" / tool)
  for version in ("3.10", "3.11", "3.12"):
    (fake / f"python-{version}").write_text(FAKE_PYTHON.format(bash=bash, version=version))
    (fake / f"python-{version}").chmod(0o755)
  (fake / "bin" / "python3").write_text((fake / f"python-{python3}").read_text())
  if python3_venv:
    (fake / f"venv-ok-{python3}").touch()
  (fake / "venv-ok-3.11").touch()   # python3.11-venv comes with python3.11 in the fake apt
  stubs = {"apt-get": FAKE_APT.format(bash=bash),
           "sudo": f'#!{bash}\necho "sudo $*" >> "$LOG"\nexec "$@"\n',
           "id": f"#!{bash}\necho 1000\n", "hostname": f"#!{bash}\necho worker-0\n"}
  for name, text in stubs.items():
    (fake / "bin" / name).write_text(text)
  for path in (fake / "bin").iterdir():
    if not path.is_symlink():
      path.chmod(0o755)
  log = tmp_path / "calls.log"
  env = {"PATH": str(fake / "bin"), "HOME": str(home), "FAKE": str(fake), "LOG": str(log),
         "APT_HAS_PYTHON311": "1" if apt_python311 else "0"}
  return env, home, log


def install_on(env, check=True):
  (argv,) = tpu("install")
  result = remote(assert_ssh_all(argv), env, check=check)
  log = pathlib.Path(env["LOG"])
  return result, log.read_text().splitlines() if log.exists() else []


def test_tpu_vm_install_on_ubuntu_2204_takes_python311_from_apt(tmp_path):
  """The JAX images: python3 is 3.10, so python3.11 comes from the image's Ubuntu archive."""
  env, home, _ = fake_tpu_vm(tmp_path, python3="3.10")
  result, calls = install_on(env)
  apt = [c for c in calls if c.startswith("apt-get")]
  lock = "apt-get -o DPkg::Lock::Timeout=300"
  assert apt == [f"{lock} update -qq", f"{lock} install -y -qq python3.11 python3.11-venv"]
  assert all(f"sudo {c}" in calls for c in apt)   # not root on a TPU VM
  venv = f"{home}/vdiff-venv"
  assert f"python3.11 -m venv {venv}" in calls
  assert calls[-3:-1] == ["venv-python -m pip install --quiet --upgrade pip",
                          f"venv-python -m pip install --quiet -e {home}/vdiff[tpu]"]
  assert calls[-1] == "venv-python -m launch.distributed"
  assert "no Python >= 3.11 on this image" in result.stdout


def test_tpu_vm_install_uses_a_recent_image_python_without_apt(tmp_path):
  env, home, _ = fake_tpu_vm(tmp_path, python3="3.12")
  _, calls = install_on(env)
  assert not [c for c in calls if c.startswith(("apt-get", "sudo"))]
  assert f"python3 -m venv {home}/vdiff-venv" in calls
  # Without ensurepip (Debian's split python3.12-venv), apt adds just that package.
  env, home, _ = fake_tpu_vm(tmp_path / "b", python3="3.12", python3_venv=False)
  _, calls = install_on(env)
  assert [c for c in calls if c.startswith("apt-get") and "install" in c] == [
      "apt-get -o DPkg::Lock::Timeout=300 install -y -qq python3.12-venv"]
  assert f"python3 -m venv {home}/vdiff-venv" in calls


def test_tpu_vm_install_without_any_python311_is_a_clear_error(tmp_path):
  env, _, _ = fake_tpu_vm(tmp_path, python3="3.10", apt_python311=False)
  result, calls = install_on(env, check=False)
  assert result.returncode != 0
  assert "BASE_PYTHON=/path/to/python3.11" in result.stderr
  assert "tpu-ubuntu2204-base" in result.stderr
  assert not [c for c in calls if "venv" in c.split()[:3]]
  # BASE_PYTHON is checked too: a 3.10 one is refused before anything is installed.
  env, home, _ = fake_tpu_vm(tmp_path / "b", python3="3.10")
  (argv,) = tpu("install", BASE_PYTHON=str(tmp_path / "b" / "fake" / "bin" / "python3"))
  result = remote(assert_ssh_all(argv), env, check=False)
  assert result.returncode != 0 and "not a Python >= 3.11" in result.stderr


def test_tpu_copy_clone_delete(tmp_path):
  archive, scp, cleanup, ssh = tpu("copy")
  assert archive[:4] == ["git", "-C", str(REPO), "archive"]
  tarball = archive[archive.index("-o") + 1]
  assert cleanup == ["rm", "-f", tarball]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "my-tpu:vdiff.tar.gz"] and flag(scp, "--worker") == "all"
  unpack = assert_ssh_all(ssh)
  # The unpack line, run in a fake home, puts the archive's files into ~/vdiff.
  home = tmp_path / "home"
  (home / "vdiff").mkdir(parents=True)
  (home / "vdiff" / "stale.py").write_text("")
  src = tmp_path / "src"
  (src / "launch").mkdir(parents=True)
  (src / "launch" / "x.py").write_text("x = 1\n")
  subprocess.run(["tar", "-czf", str(home / "vdiff.tar.gz"), "-C", str(src), "."], check=True)
  remote(unpack, {"PATH": os.environ["PATH"], "HOME": str(home)})
  assert (home / "vdiff" / "launch" / "x.py").read_text() == "x = 1\n"
  assert not (home / "vdiff" / "stale.py").exists()
  assert not (home / "vdiff.tar.gz").exists()
  result = script("tpu.sh", "copy", env={**TPU_ENV, "REMOTE_DIR": "~"})
  assert result.returncode != 0 and "wiped" in result.stderr

  (argv,) = tpu("clone", REPO_REF="v1.0")
  command = assert_ssh_all(argv)
  assert "git clone --quiet https://example.com/vdiff.git ~/vdiff" in command
  assert command.endswith("checkout --quiet --detach v1.0")

  (argv,) = tpu("delete")
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu"]
  assert "--force" in argv
  (argv,) = tpu("delete", CREATE_MODE="vm")
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu"]


# --- gpu.sh ---

def test_gpu_single_host():
  (argv,) = commands(script("gpu.sh", "train", CONFIG, "/runs/c", "--config.x=1"))
  assert argv == ["python3", "-m", "launch.train", "--config", CONFIG, "--workdir", "/runs/c",
                  "--config.x=1"]
  (argv,) = commands(script("gpu.sh", "sample", "/runs/c", "--num", "4", "--steps", "8",
                            env={"PYTHON": "/venv/bin/python"}))
  assert argv == ["/venv/bin/python", "-m", "launch.sample", "--workdir", "/runs/c", "--num",
                  "4", "--steps", "8"]


def test_gpu_install_uses_the_cuda12_extra(tmp_path):
  (argv,) = commands(script("gpu.sh", "install"))
  assert argv[:2] == ["bash", "-c"] and "pip install --quiet -e '.[cuda12]'" in argv[2]
  hostfile = tmp_path / "hosts"
  hostfile.write_text("node-a\nnode-b\n")
  lines = commands(script("gpu.sh", "install", str(hostfile)))
  assert [a[3] for a in lines] == ["node-a", "node-b"]
  assert all("-e '.[cuda12]'" in a[4] for a in lines)


def test_gpu_multi_one_process_per_host(tmp_path, stub):
  hostfile = tmp_path / "hosts"
  hostfile.write_text("# GPU nodes\nalice@node-a   # coordinator\n\nnode-b\n")
  checkout = tmp_path / "checkout"
  checkout.mkdir()
  env = {"PYTHON": str(stub[0]), "REMOTE_DIR": str(checkout), "LOG_DIR": str(tmp_path / "logs"),
         "PORT": "23456"}
  lines = commands(script("gpu.sh", "multi", str(hostfile), CONFIG, "/nfs/run", "--config.x=1",
                          env=env))
  assert len(lines) == 2
  assert [argv[:4] for argv in lines] == [["ssh", "-o", "BatchMode=yes", "alice@node-a"],
                                          ["ssh", "-o", "BatchMode=yes", "node-b"]]
  for argv in lines:  # run each host's command here
    remote(argv[4], {"PATH": os.environ["PATH"], "STUB_OUT": str(stub[1])})
  for i in range(2):
    rec = wait_for(stub[1] / f"{i}.json")
    assert rec["env"]["COORDINATOR_ADDRESS"] == "node-a:23456"
    assert rec["env"]["NUM_PROCESSES"] == "2" and rec["env"]["PROCESS_ID"] == str(i)
    assert rec["argv"] == ["-m", "launch.train", "--config", CONFIG, "--workdir", "/nfs/run",
                           "--config.x=1"]
    assert rec["cwd"] == str(checkout)
  stops = commands(script("gpu.sh", "stop", str(hostfile), env=env))
  assert [s[3] for s in stops] == ["alice@node-a", "node-b"]
  assert all("kill -TERM" in s[4] for s in stops)
  result = script("gpu.sh", "multi", str(tmp_path / "missing"), CONFIG, "/w")
  assert result.returncode != 0 and "hostfile" in result.stderr


def test_gpu_slurm(tmp_path, stub):
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  scontrol = bin_dir / "scontrol"  # expands node[07-08] the way SLURM's does
  scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[07-08]" ] && '
                      'printf "node07\\nnode08\\n"\n')
  scontrol.chmod(0o755)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[07-08]",
         "SLURM_NTASKS": "2", "PYTHON": str(stub[0])}
  (argv,) = commands(script("gpu.sh", "slurm", CONFIG, "/lustre/run", env=env))
  variables, rest = env_of(argv)
  assert variables == {"COORDINATOR_ADDRESS": "node07:12355", "NUM_PROCESSES": "2"}
  assert rest[:2] == ["srun", "--kill-on-bad-exit=1"]
  task = rest[rest.index("bash"):]  # what srun starts on each task
  subprocess.run(task, env={**os.environ, "SLURM_PROCID": "1", "STUB_OUT": str(stub[1])},
                 check=True, timeout=30)
  rec = wait_for(stub[1] / "1.json")
  assert rec["env"]["PROCESS_ID"] == "1"
  assert rec["argv"] == ["-m", "launch.train", "--config", CONFIG, "--workdir", "/lustre/run"]


def no_slurm_path():
  """This machine's PATH, which has no SLURM command (as off a cluster)."""
  path = os.environ["PATH"]
  assert not any(shutil.which(c, path=path) for c in ("sbatch", "srun", "scontrol"))
  return path


def test_gpu_slurm_dry_run_off_cluster_prints_the_job_it_would_submit():
  path = no_slurm_path()
  env = {"PATH": path, "NODES": "4", "GPUS_PER_NODE": "8", "TIME_LIMIT": "24:00:00"}
  (argv,) = commands(script("gpu.sh", "--dry-run", "slurm", CONFIG, "/lustre/run",
                            "--config.name=a b", env=env, dry=False))
  assert argv[0] == "sbatch"
  assert flag(argv, "--nodes") == "4" and flag(argv, "--ntasks-per-node") == "1"
  assert flag(argv, "--gpus-per-node") == "8" and flag(argv, "--time") == "24:00:00"
  assert flag(argv, "--signal") == "TERM@120" and flag(argv, "--chdir") == str(REPO)
  job = shlex.split(flag(argv, "--wrap"))
  assert job == ["launch/scripts/gpu.sh", "slurm", CONFIG, "/lustre/run", "--config.name=a b"]
  # The job's command, as it runs inside the allocation (no scontrol on this PATH: the node
  # list is expanded by the script itself), starts one task per node through srun.
  allocation = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1",
                "SLURM_JOB_NODELIST": "gpu-node[01-04]", "SLURM_NTASKS": "4"}
  inside = subprocess.run(["bash", *job], cwd=REPO, env=allocation, capture_output=True,
                          text=True, timeout=30)
  (srun,) = commands(inside)
  variables, rest = env_of(srun)
  assert variables == {"COORDINATOR_ADDRESS": "gpu-node01:12355", "NUM_PROCESSES": "4"}
  assert rest[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert rest[rest.index("python3"):] == ["python3", "-m", "launch.train", "--config", CONFIG,
                                          "--workdir", "/lustre/run", "--config.name=a b"]
  # Submitting for real needs sbatch.
  result = script("gpu.sh", "slurm", CONFIG, "/w", env={"PATH": path}, dry=False)
  assert result.returncode != 0 and "sbatch not found" in result.stderr


@pytest.mark.parametrize("nodelist,first", [
    ("node[07-08]", "node07"), ("gpu-node[01-04],x[1-2]", "gpu-node01"), ("a,b[1-3]", "a"),
    ("single", "single"), ("n[3,5-7]", "n3"), ("n[12]", "n12")])
def test_gpu_slurm_coordinator_is_the_first_node_without_scontrol(nodelist, first):
  env = {"PATH": no_slurm_path(), "SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "2"}
  (argv,) = commands(script("gpu.sh", "slurm", CONFIG, "/w", env=env))
  assert env_of(argv)[0]["COORDINATOR_ADDRESS"] == f"{first}:12355"


# --- local.sh ---

def test_local_multiprocess_dry_run():
  lines = commands(script("local.sh", "multiprocess", "2", CONFIG, "/tmp/run", "--config.x=1",
                          env={"DEVICES_PER_PROCESS": "3", "XLA_FLAGS": "--xla_dump_to=/d"}))
  assert len(lines) == 2
  envs = [env_of(argv)[0] for argv in lines]
  assert [e["PROCESS_ID"] for e in envs] == ["0", "1"]
  assert all(e["NUM_PROCESSES"] == "2" and e["JAX_PLATFORMS"] == "cpu" for e in envs)
  assert envs[0]["COORDINATOR_ADDRESS"] == envs[1]["COORDINATOR_ADDRESS"]
  assert re.fullmatch(r"127\.0\.0\.1:\d+", envs[0]["COORDINATOR_ADDRESS"])
  assert all(e["XLA_FLAGS"] == "--xla_dump_to=/d --xla_force_host_platform_device_count=3"
             for e in envs)
  for argv in lines:
    assert env_of(argv)[1] == ["python3", "-m", "launch.train", "--config", CONFIG, "--workdir",
                               "/tmp/run", "--config.x=1"]
  (argv,) = commands(script("local.sh", "train", CONFIG, "/tmp/run"))
  assert argv == ["python3", "-m", "launch.train", "--config", CONFIG, "--workdir", "/tmp/run"]
  result = script("local.sh", "multiprocess", "two", CONFIG, "/tmp/run")
  assert result.returncode != 0 and "process count" in result.stderr


def test_local_multiprocess_runs_waits_and_stops_all_on_failure(tmp_path, stub):
  env = {"PYTHON": str(stub[0]), "STUB_OUT": str(stub[1]), "PORT": "34567"}
  ok = script("local.sh", "multiprocess", "3", CONFIG, str(tmp_path / "run"), dry=False,
              env={**env, "STUB_MODE": "exit"})
  assert ok.returncode == 0, ok.stderr
  for i in range(3):
    rec = json.loads((stub[1] / f"{i}.json").read_text())
    assert rec["env"]["PROCESS_ID"] == str(i) and rec["env"]["NUM_PROCESSES"] == "3"
    assert rec["env"]["COORDINATOR_ADDRESS"] == "127.0.0.1:34567"
    assert rec["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    assert rec["cwd"] == str(REPO)
  assert sorted(p.name for p in (tmp_path / "run" / "logs").iterdir()) == [
      "process_1.log", "process_2.log"]

  for p in stub[1].iterdir():
    p.unlink()
  start = time.time()
  failed = script("local.sh", "multiprocess", "3", CONFIG, str(tmp_path / "run"), dry=False,
                  env={**env, "STUB_MODE": "fail1"})
  assert failed.returncode == 3 and "stopping the others" in failed.stderr
  assert time.time() - start < 10  # the survivors (sleeping 30 s) were stopped
  assert (stub[1] / "0.term").exists() and (stub[1] / "2.term").exists()
  assert not (stub[1] / "1.term").exists()


# --- distill (all three scripts) ---

@pytest.mark.parametrize("name", ["local.sh", "gpu.sh"])
def test_distill_runs_the_pipeline_entry_point(name):
  (argv,) = commands(script(name, "distill", "runs/digits", "configs/distill/digits.py",
                            "runs/d", "--config.distill.end_steps=4"))
  assert argv == ["python3", "-m", "launch.distill", "--teacher", "runs/digits", "--config",
                  "configs/distill/digits.py", "--workdir", "runs/d",
                  "--config.distill.end_steps=4"]
  missing = script(name, "distill", "runs/digits", "configs/distill/nope.py", "runs/d")
  assert missing.returncode != 0 and "configs/distill/nope.py not found" in missing.stderr
  short = script(name, "distill", "runs/digits")
  assert short.returncode != 0 and "TEACHER CONFIG WORKDIR" in short.stderr


def test_tpu_distill_runs_detached_on_every_worker():
  (argv,) = tpu("distill", "gs://bucket/teacher", "configs/distill/cifar10.py",
                "--config.distill.train_steps=10")
  assert ("python -m launch.distill --teacher gs://bucket/teacher --config "
          "configs/distill/cifar10.py --workdir gs://bucket/run "
          "--config.distill.train_steps=10 >> ~/vdiff-logs/distill.log" in assert_ssh_all(argv))


# --- every dry run ---

DRY_RUNS = [
    ("tpu.sh", ["create"]), ("tpu.sh", ["copy"]), ("tpu.sh", ["clone"]), ("tpu.sh", ["install"]),
    ("tpu.sh", ["train", CONFIG]), ("tpu.sh", ["evaluate"]), ("tpu.sh", ["sample"]),
    ("tpu.sh", ["distill", "gs://bucket/teacher", "configs/distill/cifar10.py"]),
    ("tpu.sh", ["logs"]), ("tpu.sh", ["status"]), ("tpu.sh", ["stop"]), ("tpu.sh", ["delete"]),
    ("gpu.sh", ["install"]), ("gpu.sh", ["install", "HOSTS"]), ("gpu.sh", ["train", CONFIG, "/r"]),
    ("gpu.sh", ["evaluate", "/r"]), ("gpu.sh", ["sample", "/r"]),
    ("gpu.sh", ["distill", "/t", "configs/distill/cifar10.py", "/r"]),
    ("gpu.sh", ["multi", "HOSTS", CONFIG, "/r"]), ("gpu.sh", ["logs", "HOSTS"]),
    ("gpu.sh", ["stop", "HOSTS"]), ("gpu.sh", ["slurm", CONFIG, "/r"]),
    ("local.sh", ["train", CONFIG, "/r"]), ("local.sh", ["evaluate", "/r"]),
    ("local.sh", ["sample", "/r"]), ("local.sh", ["distill", "/t", "configs/distill/cifar10.py", "/r"]),
    ("local.sh", ["multiprocess", "2", CONFIG, "/r"]),
]


@pytest.mark.parametrize("name,args", DRY_RUNS, ids=[f"{n} {a[0]}" for n, a in DRY_RUNS])
def test_every_dry_run_prints_and_runs_nothing(tmp_path, name, args):
  """--dry-run of every subcommand, with tools that act (gcloud, ssh, SLURM, nohup) replaced
  by stubs that would leave a mark: each prints its commands and calls none of them."""
  hosts = tmp_path / "hosts"
  hosts.write_text("node-a\nnode-b\n")
  fake = tmp_path / "bin"
  fake.mkdir()
  for tool in ("gcloud", "ssh", "scp", "sbatch", "srun", "scontrol", "nohup", "tar"):
    (fake / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/called-{tool}\n")
    (fake / tool).chmod(0o755)
  env = {**TPU_ENV, "PATH": f"{fake}:{os.environ['PATH']}"}
  args = [str(hosts) if a == "HOSTS" else a for a in args]
  result = script(name, "--dry-run", *args, env=env, dry=False)
  assert result.returncode == 0, result.stderr
  assert commands(result)
  assert sorted(p.name for p in tmp_path.glob("called-*")) == []
